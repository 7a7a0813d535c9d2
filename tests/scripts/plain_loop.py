"""A plain PyTorch loop, no Trainer: it reports each step with kaio.log (and runs the same without kaio)."""

import sys

import torch

import kaio

torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x = torch.randn(64, 8)
y = x @ torch.arange(8.0).unsqueeze(1)
for step in range(1, int(sys.argv[1]) + 1):
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    kaio.log(step=step, loss=loss.item(), learning_rate=0.05, tokens=64 * 8, samples=64, my_metric=float(step) / 10)
    if step % 3 == 0:  # an evaluation's number, for the step just reported
        kaio.log(step=step, eval_mse=loss.item() / 2)
print("plain loop done")
