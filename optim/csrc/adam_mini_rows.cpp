// Adam-mini's whole update for chunks of complete blocks, on CPU, in one pass over memory per block.
//
// Built and loaded at run time by optim/native.py (g++ -O3 -march=native -fopenmp -ffp-contract=off, plain C
// ABI, no torch headers). A chunk is `rows` consecutive blocks of `length` elements each (one block per row);
// per block:
//
//   s    = sum_j g_j^2                       (64 independent fp32 lanes, then a fixed tree: the order does
//                                             not depend on the vector width or the thread count)
//   v    = b2 v + (1 - b2) s / length
//   c    = lr / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)
//   m_j  = b1 m_j + (1 - b1) g_j             (fp32, three roundings: -ffp-contract=off forbids an FMA, so the
//                                             eager and compiled paths compute the same bits; then stored
//                                             in m's dtype, bf16 rounded to nearest even)
//   p_j  = p_j decay - c m_j                 (m_j as stored; decay = 1 - lr wd for decayed chunks, else 1)
//
// The row of g is read from memory once: the block sum pulls it into L1/L2 and the update re-reads it
// from there, so a step moves p, g, m in and p, m out (20 B per fp32 parameter with an fp32 m, 16 B with a
// bf16 m), against fused AdamW's p, g, m, v in and p, m, v out (28 B). p, g and m may each be fp32 or bf16
// (rounded to nearest even, like torch's casts); v is fp32. Work is split into tasks of whole rows (built by
// the caller) and run with OpenMP's dynamic schedule: each row is computed the same way whatever the thread
// count.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float load(const float* x, int64_t i) { return x[i]; }
inline float load(const uint16_t* x, int64_t i) { return bf16_to_float(x[i]); }
// store() writes f in x's type and returns the value as stored (for bf16: f rounded to nearest even).
inline float store(float* x, int64_t i, float f) {
  x[i] = f;
  return f;
}
inline float store(uint16_t* x, int64_t i, float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
  const uint16_t b = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN stays NaN
  x[i] = b;
  return bf16_to_float(b);
}

constexpr int kLanes = 64;

// The fields of optim.update.StepHyper, in its order.
struct Hyper {
  float b1, one_minus_b1, b2, one_minus_b2, bc2, lr_over_bc1, eps, decay;
};

// Blocks of one element (biases, `elements` embeddings): step_rows' arithmetic without its per-row lane set-up
// (the lane sum of one square is that square, and s / 1 is s), as one loop the compiler can vectorise.
template <class P, class G, class M>
void step_elements(P* p, const G* g, M* m, float* v, int64_t row0, int64_t row1, const Hyper& h, float decay) {
  for (int64_t r = row0; r < row1; ++r) {
    const float x = load(g, r);
    const float vr = h.b2 * v[r] + h.one_minus_b2 * (x * x);
    v[r] = vr;
    const float scale = h.lr_over_bc1 / (std::sqrt(vr / h.bc2) + h.eps);
    const float mr = store(m, r, h.b1 * load(m, r) + h.one_minus_b1 * x);
    store(p, r, load(p, r) * decay - scale * mr);
  }
}

template <class P, class G, class M>
void step_rows(P* p, const G* g, M* m, float* v, int64_t row0, int64_t row1, int64_t n, const Hyper& h,
               float decay) {
  if (n == 1) return step_elements(p, g, m, v, row0, row1, h, decay);
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t r = row0; r < row1; ++r) {
    P* pr = p + r * n;
    const G* gr = g + r * n;
    M* mr = m + r * n;
    float acc[kLanes];
    for (int k = 0; k < kLanes; ++k) acc[k] = 0.0f;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int k = 0; k < kLanes; ++k) {
        const float x = load(gr, j + k);
        acc[k] += x * x;
      }
    for (int k = 0; j < n; ++j, ++k) {
      const float x = load(gr, j);
      acc[k] += x * x;
    }
    for (int w = kLanes / 2; w > 0; w >>= 1)
      for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
    const float vr = h.b2 * v[r] + h.one_minus_b2 * (acc[0] * inv_n);
    v[r] = vr;
    const float scale = h.lr_over_bc1 / (std::sqrt(vr / h.bc2) + h.eps);
    for (j = 0; j < n; ++j) {
      const float mj = store(mr, j, h.b1 * load(mr, j) + h.one_minus_b1 * load(gr, j));
      store(pr, j, load(pr, j) * decay - scale * mj);
    }
  }
}

struct Task {
  const int64_t* chunk;
  int64_t row0, row1;
  const Hyper& h;
};

template <class P, class G, class M>
void run(const Task& t) {
  const int64_t* c = t.chunk;
  step_rows(reinterpret_cast<P*>(c[0]), reinterpret_cast<const G*>(c[1]), reinterpret_cast<M*>(c[2]),
            reinterpret_cast<float*>(c[3]), t.row0, t.row1, c[5], t.h, (c[6] & 4) ? t.h.decay : 1.0f);
}

template <class P, class G>
void with_m(const Task& t) {
  if (t.chunk[6] & 8) run<P, G, uint16_t>(t); else run<P, G, float>(t);
}

template <class P>
void with_g(const Task& t) {
  if (t.chunk[6] & 2) with_m<P, uint16_t>(t); else with_m<P, float>(t);
}

void dispatch(const Task& t) {
  if (t.chunk[6] & 1) with_g<uint16_t>(t); else with_g<float>(t);
}

}  // namespace

extern "C" {

// Table layouts (int64, filled by optim/native.py):
//   chunks[7 * c ...]: p address, g address, m address, v address, rows, length, flags
//                      flags: bit 0 p is bf16, bit 1 g is bf16, bit 2 weight decay applies, bit 3 m is bf16
//   tasks[3 * k ...]:  chunk index, first row, end row
//   hyper[8] (double): optim.update.StepHyper's fields in order:
//                      b1, 1 - b1, b2, 1 - b2, 1 - b2^t, lr / (1 - b1^t), eps, 1 - lr wd
int adam_mini_rows_step(const int64_t* chunks, const int64_t* tasks, int64_t n_tasks, const double* hyper,
                        int threads) {
  const Hyper h{static_cast<float>(hyper[0]), static_cast<float>(hyper[1]), static_cast<float>(hyper[2]),
                static_cast<float>(hyper[3]), static_cast<float>(hyper[4]), static_cast<float>(hyper[5]),
                static_cast<float>(hyper[6]), static_cast<float>(hyper[7])};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t k = 0; k < n_tasks; ++k)
    dispatch(Task{chunks + 7 * tasks[3 * k], tasks[3 * k + 1], tasks[3 * k + 2], h});
  return 0;
}

// Lets the loader check that it talks to the build it expects.
int adam_mini_rows_abi(void) { return 2; }

}  // extern "C"
