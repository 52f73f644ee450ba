"""A fixed panel of validation images for TensorBoard: per dense task, one image whose rows are
samples and whose columns are input | ground truth | teacher | student (segmentation coloured
by class, depth as a colour ramp, normals as RGB: each task kind's `show`). The teacher's
column is computed once, at the first render (it is frozen); the student's every validation epoch."""

from __future__ import annotations

from typing import Dict, Optional

import torch


class ValidationPanel:
    def __init__(self, batch: dict, tasks, mean, std, teacher: Optional[torch.nn.Module], size: int = 4):
        self.image = batch["image"][:size]
        self.targets = {name: t[:size] for name, t in batch["targets"].items()}
        self.tasks = {name: task for name, task in tasks.items() if task.kind.dense}
        view = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=self.image.device).view(view)
        std = torch.tensor(std, device=self.image.device).view(view)
        self.input = (self.image.float() * std + mean).clamp(0, 1)[:, :3]
        self.teacher = teacher
        self.teacher_rgb: Optional[Dict[str, torch.Tensor]] = None    # at the first render, not at start-up

    def _show(self, name: str, value: torch.Tensor) -> torch.Tensor:
        task = self.tasks[name]
        return task.kind.show(value, task.spec).float().clamp(0, 1)

    @torch.no_grad()
    def render(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """{task: [3, rows * H, columns * W]} for the model as it is now."""
        was_training = model.training
        model.eval()
        out = model(self.image)["outputs"]
        model.train(was_training)
        if self.teacher_rgb is None:
            self.teacher_rgb = {}
            if self.teacher is not None:
                teacher_out = self.teacher(self.image)["outputs"]
                self.teacher_rgb = {n: self._show(n, teacher_out[n]) for n in self.tasks if n in teacher_out}
        panels = {}
        for name, task in self.tasks.items():
            columns = [self.input, self._show(name, self.targets[task.target])]
            if name in self.teacher_rgb:
                columns.append(self.teacher_rgb[name])
            columns.append(self._show(name, out[name]))
            rows = torch.cat([c.cpu() for c in columns], dim=3)        # side by side
            panels[name] = torch.cat(list(rows), dim=1)               # samples stacked
        return panels
