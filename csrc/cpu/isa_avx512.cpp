// The CPU kernels built for the avx512 instruction set: -mavx512f -mavx512vl -mavx512bw -mavx512dq
// -mfma (32 vector registers). Register blocking: 6 output channels x up to 3 32-byte column
// vectors.
#define FMNIST_ISA isa_avx512
#define FMNIST_COB 6
#define FMNIST_NV 3
#include "kernels_impl.h"
