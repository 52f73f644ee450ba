"""A distillation method of your own: `loss=logit_mse` (or `loss=[kd,logit_mse]`): the mean squared
error between the student's and the teacher's logits (Ba & Caruana, 2014), on every classification
or segmentation task the teacher covers. A method maps (student outputs, teacher outputs, batch,
progress) to named terms `logit_mse/<task>`; `loss.logit_mse.weight` weighs them."""

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod


@dataclass
class LogitMSESettings:
    weight: Any = 1.0        # a number, or {task: number}


@KD_METHODS.register("logit_mse", settings=LogitMSESettings)
class LogitMSE(LabelTaskMethod):
    name = "logit_mse"

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"logit_mse/{task}": F.mse_loss(student_out["outputs"][task].float(),
                                                teacher_out["outputs"][task].float())
                for task in self.label_tasks}
