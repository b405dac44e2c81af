"""Baseline for session 18's A/B: the backward's dQ kernel on the same stream as dK/dV, after it
(the launcher before dQ moved to a side stream). The kernels are the landed ones; run with
``bench/local_window_attention_gluon_gpu.py sequential=PATH``."""
from fewstep.triton import local_window_attention as lwa
from fewstep.triton._local_window_attention_gluon import (forward_kernel_sm90, kv_grad_kernel_sm90,  # noqa: F401
                                                          q_grad_kernel_sm90)


class _OneStream(lwa._SideLaunch):
    def __init__(self, t):
        self.main, self.forked = None, None  # what the launcher does for CPU tensors: no side stream


def launch_backward(gluon, *args):
    landed = lwa._SideLaunch
    lwa._SideLaunch = _OneStream
    try:
        return lwa.launch_backward(gluon, *args)
    finally:
        lwa._SideLaunch = landed
