// FEWSTEP_HOST_DEVICE: functions the CPU and CUDA kernels share (host and device under nvcc).
#pragma once

#ifdef __CUDACC__
#define FEWSTEP_HOST_DEVICE __host__ __device__
#else
#define FEWSTEP_HOST_DEVICE
#endif
