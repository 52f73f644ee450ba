"""Seconds per training step of the COCO tutorial models at 224 px on this machine, so a user can
size a run (`+experiment=coco_cls_seg`): the ResNet-50 teacher's fine-tuning step, the ResNet-18
student's KD step with the teacher running (teacher.cache=off), and the student's step alone (the
teacher's outputs read from a cache, teacher.cache=views). Models as the experiment builds them
(80-label multi-label head + 81-class segmentation decoder), kdmtl's hardware defaults (fp32,
channels_last, keep_freed_memory), random data, Adam.

    python scripts/coco_step_time.py [--batch 32] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from kdmtl_cli.data import TargetSpec
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import section_schema
    from kdmtl_cli.tasks import build_tasks

    hardware = setup_hardware(OmegaConf.create({"device": "cpu", "precision": "32", "num_threads": args.threads,
                                                "deterministic": True, "channels_last": True,
                                                "keep_freed_memory": True, "compile": False,
                                                "compile_mode": "default", "nproc": 1}))
    tasks = build_tasks(OmegaConf.create({"labels": {"kind": "multilabel"}, "seg": {"kind": "segmentation"}}),
                        {"labels": TargetSpec("multilabel", 80), "seg": TargetSpec("segmentation", 81)})

    def model(arch):
        node = OmegaConf.merge(OmegaConf.structured(section_schema("student", arch)),
                               {"arch": arch, "small_input": False, "decoder_width": 64})
        return hardware.prepare_model(build_model(node, tasks))

    teacher, student = model("resnet50"), model("resnet18")
    n, s = args.batch, args.size
    image = hardware.to_input(torch.randn(n, 3, s, s))
    targets = {"labels": (torch.rand(n, 80) < 0.05).float(), "seg": torch.randint(0, 81, (n, s, s))}

    def task_loss(out):
        return sum(tasks[t].kind.loss(out["outputs"][t], targets[t]) for t in tasks)

    def kd_loss(out, teacher_out):
        return sum(tasks[t].kind.distill(out["outputs"][t], teacher_out["outputs"][t], 4.0, "l1") for t in tasks)

    def timed(label, net, step):
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        times = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step(net).backward()
            optimizer.step()
            if i:
                times.append(time.perf_counter() - start)
        print(f"{label:<52} {statistics.median(times):6.2f} s/step  ({n / statistics.median(times):5.1f} images/s; "
              f"steps: {', '.join(f'{t:.2f}' for t in times)})", flush=True)

    print(f"{torch.get_num_threads()} threads, batch {n}, {s} x {s} px, fp32, channels_last")
    timed("teacher ResNet-50: fine-tuning step", teacher, lambda net: task_loss(net(image)))
    teacher.eval()
    with torch.no_grad():
        cached = teacher(image)

    def kd_step(net):
        with torch.no_grad():
            teacher_out = teacher(image)
        out = net(image)
        return task_loss(out) + kd_loss(out, teacher_out)

    timed("student ResNet-18: KD step, teacher forward included", student, kd_step)
    timed("student ResNet-18: KD step, teacher outputs cached", student,
          lambda net: (lambda out: task_loss(out) + kd_loss(out, cached))(net(image)))


if __name__ == "__main__":
    main()
