/* The CPU LIF kernels of dassdp (the "cpu" backend, dassdp/neurons/backends/cpu.py).

   Built on first use with the system C compiler by dassdp/_util/native.py, with
   -O3 -march=native -ffp-contract=off -fno-math-errno (no FMA: the torch backend rounds every
   product). The math is dassdp/neurons/lif.py's; the operations and their order are those of
   the torch backend (torch_fused.py), so H and the spikes are bit-identical to it. */
#include <math.h>
#include <stdint.h>

#define BLOCK 512

/* Forward over neurons [n0, n1) of x [T, N]: H, S (0/1 in the dtype) and S as bytes. The
   operations and their order are those of dassdp's torch backend (_FusedLIF.forward). */
#define LIF_FWD(NAME, R)                                                                   \
void NAME(const R* restrict x, R* restrict h, R* restrict s, uint8_t* restrict bits,       \
          int64_t T, int64_t N, int64_t n0, int64_t n1, double k_, double v_th_,           \
          double v_r_, int hard, int decay_input) {                                        \
    const R k = (R)k_, v_th = (R)v_th_, v_r = (R)v_r_;                                     \
    R v[BLOCK];                                                                            \
    for (int64_t b = n0; b < n1; b += BLOCK) {                                             \
        const int64_t m = (n1 - b < BLOCK) ? n1 - b : BLOCK;                               \
        for (int64_t t = 0; t < T; ++t) {                                                  \
            const R* xt = x + t * N + b;                                                   \
            R* ht = h + t * N + b;                                                         \
            R* st = s + t * N + b;                                                         \
            uint8_t* bt = bits + t * N + b;                                                \
            for (int64_t j = 0; j < m; ++j) {                                              \
                R hj;                                                                      \
                if (t == 0 && v_r == (R)0) {                                               \
                    hj = decay_input ? xt[j] * k : xt[j];                                  \
                } else {                                                                   \
                    const R vv = (t == 0) ? (R)0 : v[j];                                   \
                    if (decay_input) {                                                     \
                        R tmp = (v_r != (R)0) ? xt[j] - (vv - v_r) : xt[j] - vv;           \
                        tmp = tmp * k;                                                     \
                        hj = vv + tmp;                                                     \
                    } else {                                                               \
                        const R tmp = (v_r != (R)0) ? (vv - v_r) * k : vv * k;             \
                        hj = (vv - tmp) + xt[j];                                           \
                    }                                                                      \
                }                                                                          \
                const int fired = hj >= v_th;                                              \
                const R sj = fired ? (R)1 : (R)0;                                          \
                v[j] = hard ? (fired ? v_r : hj) : hj - v_th * sj;                         \
                ht[j] = hj;                                                                \
                st[j] = sj;                                                                \
                bt[j] = (uint8_t)fired;                                                    \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}

/* Backward over neurons [n0, n1): gX from H and gS (_FusedLIF.backward's math, op for op).
   surrogate 0 = atan, 1 = sigmoid. Each loop below is branch-free inside, so it vectorises. */
#define LIF_BWD(NAME, R, EXP)                                                              \
void NAME(const R* restrict h, const R* restrict gs, R* restrict gx, int64_t T, int64_t N, \
          int64_t n0, int64_t n1, double k_, double v_th_, double v_r_, int hard,          \
          int decay_input, int detach, int surrogate, double alpha_) {                     \
    const R k = (R)k_, v_th = (R)v_th_, v_r = (R)v_r_, alpha = (R)alpha_;                  \
    const R c_atan = (R)(3.14159265358979323846 / 2 * alpha_), half = (R)(alpha_ / 2);     \
    const R decay = (R)(1 - k_), neg_th = (R)(-v_th_);                                     \
    R gh[BLOCK], sg[BLOCK], c[BLOCK];                                                      \
    for (int64_t b = n0; b < n1; b += BLOCK) {                                             \
        const int64_t m = (n1 - b < BLOCK) ? n1 - b : BLOCK;                               \
        for (int64_t t = T - 1; t >= 0; --t) {                                             \
            const R* restrict ht = h + t * N + b;                                          \
            const R* restrict gst = gs + t * N + b;                                        \
            R* restrict gxt = gx + t * N + b;                                              \
            if (surrogate == 0) {                                                          \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    R q = (ht[j] - v_th) * c_atan;                                         \
                    q = q * q;                                                             \
                    q = q + (R)1;                                                          \
                    q = (R)1 / q;                                                          \
                    sg[j] = q * half;                                                      \
                }                                                                          \
            } else {                                                                       \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    const R z = (ht[j] - v_th) * alpha;                                    \
                    const R sig = (R)1 / ((R)1 + EXP(-z));                                 \
                    const R om = (R)1 - sig;                                               \
                    sg[j] = (sig * alpha) * om;                                            \
                }                                                                          \
            }                                                                              \
            if (t == T - 1) {                                                              \
                for (int64_t j = 0; j < m; ++j) gh[j] = sg[j] * gst[j];                    \
            } else {                                                                       \
                if (detach && hard) {          /* R = 1 - S */                             \
                    for (int64_t j = 0; j < m; ++j)                                        \
                        c[j] = ((ht[j] >= v_th) ? (R)0 : (R)1) * decay;                    \
                } else if (detach) {           /* R = 1 */                                 \
                    for (int64_t j = 0; j < m; ++j) c[j] = decay;                          \
                } else if (hard) {             /* R = 1 - S + (V_r - H) sg */              \
                    for (int64_t j = 0; j < m; ++j) {                                      \
                        R r = (v_r - ht[j]) * sg[j];                                       \
                        r = r + ((ht[j] >= v_th) ? (R)0 : (R)1);                           \
                        c[j] = r * decay;                                                  \
                    }                                                                      \
                } else {                       /* R = 1 - V_th sg */                       \
                    for (int64_t j = 0; j < m; ++j) {                                      \
                        R r = sg[j] * neg_th;                                              \
                        r = r + (R)1;                                                      \
                        c[j] = r * decay;                                                  \
                    }                                                                      \
                }                                                                          \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    const R g = sg[j] * gst[j];                                            \
                    const R p = gh[j] * c[j];                                              \
                    gh[j] = g + p;                                                         \
                }                                                                          \
            }                                                                              \
            if (decay_input) {                                                             \
                for (int64_t j = 0; j < m; ++j) gxt[j] = gh[j] * k;                        \
            } else {                                                                       \
                for (int64_t j = 0; j < m; ++j) gxt[j] = gh[j];                            \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}

LIF_FWD(lif_fwd_f32, float)
LIF_FWD(lif_fwd_f64, double)
LIF_BWD(lif_bwd_f32, float, expf)
LIF_BWD(lif_bwd_f64, double, exp)
