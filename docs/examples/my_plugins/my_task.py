"""A task kind of your own: `kind: huber`, regression with the Huber loss (delta = 1 in the
target's units), learning from the data set's `regression` targets (`reads_targets`). It inherits
the head, metrics (mae, rmse), distillation rule and picture from the built-in regression kind."""

import torch.nn.functional as F

from kdmtl_cli.tasks import TASK_KINDS
from kdmtl_cli.tasks.regression import Regression, as_scalar


@TASK_KINDS.register("huber")
class Huber(Regression):
    name = "huber"
    reads_targets = ("regression",)

    def loss(self, output, target):
        return F.huber_loss(as_scalar(output), target.float(), delta=1.0)
