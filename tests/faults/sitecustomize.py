"""Fault injection for tests, outside kdmtl's code: with this folder on PYTHONPATH, Python imports
this module at start-up (it is the `sitecustomize` hook), and `KDMTL_FAULTS` (JSON) patches
kdmtl in this process and in the processes it starts (sweep jobs, data-parallel ranks):

- {"signal_at_step": N, "signal": "TERM"|"USR1"|"KILL", "label": "student"|"teacher"|...}:
  a real signal to this process right after global step N of the trainer with that label;
- {"kill_in_checkpoint_write": N}: SIGKILL halfway through writing the N-th checkpoint;
- {"signal_at_cache_batch": N, "signal": ...}: a real signal after the N-th batch of the
  teacher-output cache build.

tests/conftest.py's `run_kdmtl(..., faults={...})` sets both variables.
"""

import json
import os

_spec = json.loads(os.environ.get("KDMTL_FAULTS") or "{}")

if _spec:
    import io
    import signal

    import torch

    from kdmtl_cli.engine import checkpoint, teacher_outputs, trainer

    _sig = getattr(signal, "SIG" + _spec.get("signal", "TERM"))

    if "signal_at_step" in _spec:
        _after_step = trainer.Trainer._after_step

        def _after_step_with_signal(self, *args, **kwargs):
            if self.state.global_step == int(_spec["signal_at_step"]) and \
                    self.label.startswith(_spec.get("label", "student")):
                os.kill(os.getpid(), _sig)
            return _after_step(self, *args, **kwargs)

        trainer.Trainer._after_step = _after_step_with_signal

    if "kill_in_checkpoint_write" in _spec:
        _writes = [0]
        _save = trainer._save_checkpoint

        def _save_then_maybe_die(state, path):
            _writes[0] += 1
            if _writes[0] != int(_spec["kill_in_checkpoint_write"]):
                return _save(state, path)

            def half_then_die(handle):
                buffer = io.BytesIO()
                torch.save({"format": checkpoint.CHECKPOINT_FORMAT, **state}, buffer)
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint._atomic_write(path, half_then_die)

        trainer._save_checkpoint = _save_then_maybe_die

    if "signal_at_cache_batch" in _spec:
        _batches = [0]
        _store = teacher_outputs.stored_array

        def _store_then_maybe_signal(value, dtype_name, name):
            result = _store(value, dtype_name, name)
            if name.startswith("outputs/"):
                _batches[0] += 1
                if _batches[0] == int(_spec["signal_at_cache_batch"]):
                    os.kill(os.getpid(), _sig)
            return result

        teacher_outputs.stored_array = _store_then_maybe_signal
