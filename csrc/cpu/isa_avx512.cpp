// The CPU kernels built for the avx512 instruction set: -mavx512f -mavx512vl -mavx512bw -mavx512dq
// -mfma (32 vector registers). Register blocking: 6 output channels x up to 3 32-byte column
// vectors, or 6 output channels x 2 rows x 1 vector (12 channels x 2 rows would fit the 32
// registers but is unmeasured: no AVX-512 machine at hand when the row-pair tiles were added).
#define FMNIST_ISA isa_avx512
#define FMNIST_COB 6
#define FMNIST_NV 3
#define FMNIST_COB2 6
#include "kernels.h"
