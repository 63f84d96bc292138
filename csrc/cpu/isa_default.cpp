// The CPU kernels built for the default instruction set: baseline x86-64 (SSE2) or the target's
// default. Register blocking: 4 output channels x up to 2 32-byte column vectors.
#define FMNIST_ISA isa_default
#define FMNIST_COB 4
#define FMNIST_NV 2
#define FMNIST_COB2 2
#include "kernels.h"
