"""Experiment (session 18): the backward's dK/dV and dQ kernels on two streams. Both read only q,
k, v, dO, lse and delta, so once delta is computed they are independent; on one stream the second
waits for the first's last programs (its tail wave). Here dQ is launched on a side stream that
waits only for delta, so its programs fill the SMs that dK/dV's tail leaves idle. The kernels are
the landed ones; run with ``bench/local_window_attention_gluon_gpu.py concurrent=PATH``."""
import functools
import torch

from fewstep.triton import local_window_attention as lwa
from fewstep.triton._local_window_attention_gluon import (forward_kernel_sm90, kv_grad_kernel_sm90,  # noqa: F401
                                                          q_grad_kernel_sm90)

SECOND = q_grad_kernel_sm90  # the kernel launched on the side stream


@functools.cache
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device_index)


def launch_backward(gluon, *args):
    main = torch.cuda.current_stream()
    side = _side_stream(main.device.index)
    landed_launch = lwa._launch
    after_delta = torch.cuda.Event()

    def launch(kernel, *launch_args):
        if kernel is SECOND:
            side.wait_event(after_delta)
            with torch.cuda.stream(side):
                landed_launch(kernel, *launch_args)
        else:
            after_delta.record(main)
            landed_launch(kernel, *launch_args)

    lwa._launch = launch
    try:
        grads = lwa.launch_backward(gluon, *args)
    finally:
        lwa._launch = landed_launch
    main.wait_stream(side)
    return grads
