// The CPU kernels built for the avx2 instruction set: -mavx2 -mfma (16 vector registers).
// Register blocking: 4 output channels x up to 3 32-byte column vectors, or 6 output channels x
// 2 rows x 1 vector (whichever wastes fewer padded channels; forward.h, choose_tiles).
#define FMNIST_ISA isa_avx2
#define FMNIST_COB 4
#define FMNIST_NV 3
#define FMNIST_COB2 6
#include "kernels.h"
