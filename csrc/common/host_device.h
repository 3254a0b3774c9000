// CK_HOST_DEVICE marks per-problem math that is compiled twice: by the host compiler for the CPU
// launcher (OpenMP, tested everywhere) and by nvcc for the CUDA launcher. Headers that use it must
// stay free of torch and CUDA runtime includes so that both compilers accept them.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_HOST_DEVICE __host__ __device__
#define CK_INLINE __forceinline__
#else
#define CK_HOST_DEVICE
#define CK_INLINE inline
#endif
