// The CPU kernels built for the avx2 instruction set: -mavx2 -mfma (16 vector registers).
// Register blocking: 4 output channels x up to 3 32-byte column vectors.
#define FMNIST_ISA isa_avx2
#define FMNIST_COB 4
#define FMNIST_NV 3
#include "kernels_impl.h"
