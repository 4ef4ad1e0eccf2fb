// Causal (or full) softmax attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Layout: q [..., t, h, d], k and v [..., s, kv, d] with h = kv * g (grouped-query attention),
// float32, row-major; the leading dims are one flattened batch. The forward returns
// o = softmax(q k^T * scale + mask) v and the log-sum-exp of each score row, lse [..., h, t];
// the backward recomputes the probabilities from lse (no [t, s] tensor is stored between
// passes). The causal mask lets query i see keys j <= i (q and k are the same tokens).
//
// Work is split into units of (batch row, kv head); each unit owns the gradients of its keys
// and values, so units never write the same memory. Inside a unit the queries go in blocks of
// kBlock rows, and every product is one call of `gemm`, a register-tiled multiply over
// compiler vector types (AVX-512, AVX2 or NEON, whatever the machine has: the library is
// compiled on the machine that runs it, kernels_cpu/build.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // floats per vector value (split by the compiler if narrower)
constexpr int64_t kBlock = 16;  // query rows per block
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// c[i][j] (+)= alpha * sum_p A(i, p) * b[p * ldb + j] for i < m, j < n, p < k, where A(i, p)
// is a[i * lda + p], or a[p * lda + i] when kTransA. n is a multiple of kLanes and b's rows
// hold n readable floats.
template <bool kTransA = false>
void gemm(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
          float* __restrict c, int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha,
          bool accumulate) {
  constexpr int R = 4, V = 2;  // a 4 x 32 tile of c lives in 8 vector registers
  auto at = [&](int64_t i, int64_t p) { return kTransA ? a[p * lda + i] : a[i * lda + p]; };
  auto put = [&](float* out, vec acc) {
    store(out, accumulate ? load(out) + alpha * acc : alpha * acc);
  };
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    int64_t j = 0;
    for (; j + V * kLanes <= n; j += V * kLanes) {
      vec acc[R][V] = {};
      for (int64_t p = 0; p < k; ++p) {
        vec bv[V];
        for (int v = 0; v < V; ++v) bv[v] = load(b + p * ldb + j + v * kLanes);
        for (int r = 0; r < R; ++r) {
          const float ar = at(i + r, p);
          for (int v = 0; v < V; ++v) acc[r][v] += ar * bv[v];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) put(c + (i + r) * ldc + j + v * kLanes, acc[r][v]);
    }
    for (; j < n; j += kLanes) {
      vec acc[R] = {};
      for (int64_t p = 0; p < k; ++p) {
        const vec bv = load(b + p * ldb + j);
        for (int r = 0; r < R; ++r) acc[r] += at(i + r, p) * bv;
      }
      for (int r = 0; r < R; ++r) put(c + (i + r) * ldc + j, acc[r]);
    }
  }
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; j += kLanes) {
      vec acc = {};
      for (int64_t p = 0; p < k; ++p) acc += at(i, p) * load(b + p * ldb + j);
      put(c + i * ldc + j, acc);
    }
}

// exp(x) to about 2 ulp on [-87, 88] (clamped outside): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its degree-7 polynomial, 2^n through the exponent bits. Written without calls
// so that loops over it vectorize.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const float n = (x * 1.44269504088896341f + round) - round;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

struct Dims {
  int64_t batch, t, h, s, kv, d;
  int64_t sp, dp;  // s and d rounded up to whole vectors
};

Dims dims_of(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k) {
  Dims m;
  const int64_t rank = q.size();
  m.batch = 1;
  for (int64_t i = 0; i + 3 < rank; ++i) m.batch *= q[i];
  m.t = q[rank - 3];
  m.h = q[rank - 2];
  m.d = q[rank - 1];
  m.s = k[rank - 3];
  m.kv = k[rank - 2];
  m.sp = round_up(m.s, kLanes);
  m.dp = round_up(m.d, kLanes);
  return m;
}

// Runs body(u) for u in [0, n) on the calling thread and on XLA's intra-op pool. Units are
// claimed one at a time, so the caller finishes the work alone if no pool thread starts; it
// waits only for units a pool thread has claimed (and is running).
template <typename F>
void parallel_units(ffi::ThreadPool& pool, int64_t n, const F& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, n, body]() {
    for (int64_t u; (u = state->next.fetch_add(1)) < n;) {
      body(u);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(drain)(drain));
  drain();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Per-thread scratch memory, grown on demand and reused by every unit a thread runs.
float* scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[12];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < size) b.resize(size);
  return b.data();
}

// rows x cols floats with row stride `stride` -> dst [total_rows][ld], zero padded.
void gather(const float* src, int64_t rows, int64_t stride, int64_t cols, float* dst, int64_t ld,
            int64_t total_rows) {
  for (int64_t j = 0; j < total_rows; ++j) {
    float* out = dst + j * ld;
    const int64_t filled = j < rows ? cols : 0;
    if (filled) std::memcpy(out, src + j * stride, cols * sizeof(float));
    std::fill(out + filled, out + ld, 0.0f);
  }
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
               int64_t ldd) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + j] = src[j * lds + c];
}

// One unit's keys and values, padded: kc, vc [sp][dp] and their transposes kt, vt [dp][sp]
// (scratch slots 0-3).
struct UnitKeys {
  float *kc, *vc, *kt, *vt;
  UnitKeys(const Dims& m, const float* k, const float* v, int64_t stride, bool with_vt)
      : kc(scratch(0, m.sp * m.dp)), vc(scratch(1, m.sp * m.dp)), kt(scratch(2, m.dp * m.sp)),
        vt(with_vt ? scratch(3, m.dp * m.sp) : nullptr) {
    gather(k, m.s, stride, m.d, kc, m.dp, m.sp);
    gather(v, m.s, stride, m.d, vc, m.dp, m.sp);
    transpose(kc, m.sp, m.dp, m.dp, kt, m.sp);
    if (with_vt) transpose(vc, m.sp, m.dp, m.dp, vt, m.sp);
  }
};

// Keys visible to query row i: j < visible(i).
inline int64_t visible(const Dims& m, bool causal, int64_t i) {
  return causal ? std::min(i + 1, m.s) : m.s;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse, int32_t causal, float scale) {
  const Dims m = dims_of(q.dimensions(), k.dimensions());
  const int64_t g = m.h / m.kv, qstride = m.h * m.d, kstride = m.kv * m.d;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  auto unit = [&](int64_t u) {
    const int64_t b = u / m.kv, kh = u % m.kv;
    const int64_t key0 = (b * m.s * m.kv + kh) * m.d;
    const UnitKeys keys(m, kp + key0, vp + key0, kstride, false);
    float *qb = scratch(4, kBlock * m.dp), *p = scratch(5, kBlock * m.sp),
          *ob = scratch(6, kBlock * m.dp);
    for (int64_t h = kh * g; h < (kh + 1) * g; ++h) {
      for (int64_t i0 = 0; i0 < m.t; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, m.t - i0);
        const int64_t np = round_up(visible(m, causal, i0 + rows - 1), kLanes);
        const int64_t row0 = ((b * m.t + i0) * m.h + h) * m.d;
        gather(qp + row0, rows, qstride, m.d, qb, m.dp, rows);
        // scores = q k^T * scale
        gemm(qb, m.dp, keys.kt, m.sp, p, m.sp, rows, np, m.d, scale, false);
        for (int64_t r = 0; r < rows; ++r) {  // probabilities, row by row
          float* pr = p + r * m.sp;
          const int64_t n = visible(m, causal, i0 + r);
          float mx = -INFINITY, l = 0.0f;
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pr[j]);
#pragma omp simd reduction(+ : l)
          for (int64_t j = 0; j < n; ++j) {
            pr[j] = exp_approx(pr[j] - mx);
            l += pr[j];
          }
          const float inv = 1.0f / l;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) pr[j] *= inv;
          std::fill(pr + n, pr + np, 0.0f);
          lp[(b * m.h + h) * m.t + i0 + r] = mx + std::log(l);
        }
        // o = p v
        gemm(p, m.sp, keys.vc, m.dp, ob, m.dp, rows, m.dp, np, 1.0f, false);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(op + row0 + r * qstride, ob + r * m.dp, m.d * sizeof(float));
      }
    }
  };
  parallel_units(pool, m.batch * m.kv, unit);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int32_t causal, float scale) {
  const Dims m = dims_of(q.dimensions(), k.dimensions());
  const int64_t g = m.h / m.kv, qstride = m.h * m.d, kstride = m.kv * m.d;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  auto unit = [&](int64_t u) {
    const int64_t b = u / m.kv, kh = u % m.kv;
    const int64_t key0 = (b * m.s * m.kv + kh) * m.d;
    const UnitKeys keys(m, kp + key0, vp + key0, kstride, true);
    // scratch slots 4-11; dka and dva accumulate this unit's key and value gradients
    float *qb = scratch(4, kBlock * m.dp), *dob = scratch(5, kBlock * m.dp),
          *p = scratch(6, kBlock * m.sp), *ds = scratch(7, kBlock * m.sp),
          *dqb = scratch(8, kBlock * m.dp), *delta = scratch(9, kBlock),
          *dka = scratch(10, m.sp * m.dp), *dva = scratch(11, m.sp * m.dp);
    std::fill(dka, dka + m.sp * m.dp, 0.0f);
    std::fill(dva, dva + m.sp * m.dp, 0.0f);
    for (int64_t h = kh * g; h < (kh + 1) * g; ++h) {
      for (int64_t i0 = 0; i0 < m.t; i0 += kBlock) {
        const int64_t rows = std::min(kBlock, m.t - i0);
        const int64_t np = round_up(visible(m, causal, i0 + rows - 1), kLanes);
        const int64_t row0 = ((b * m.t + i0) * m.h + h) * m.d;
        gather(qp + row0, rows, qstride, m.d, qb, m.dp, kBlock);
        gather(dop + row0, rows, qstride, m.d, dob, m.dp, kBlock);
        for (int64_t r = 0; r < rows; ++r) {  // delta_i = do_i . o_i
          const float* orow = op + row0 + r * qstride;
          float acc = 0.0f;
          for (int64_t c = 0; c < m.d; ++c) acc += orow[c] * dob[r * m.dp + c];
          delta[r] = acc;
        }
        gemm(qb, m.dp, keys.kt, m.sp, p, m.sp, rows, np, m.d, scale, false);
        gemm(dob, m.dp, keys.vt, m.sp, ds, m.sp, rows, np, m.d, 1.0f,
             false);  // dp = do v^T
        for (int64_t r = 0; r < rows; ++r) {  // p = exp(s - lse); ds = p (dp - delta) scale
          float *pr = p + r * m.sp, *dr = ds + r * m.sp;
          const int64_t n = visible(m, causal, i0 + r);
          const float li = lp[(b * m.h + h) * m.t + i0 + r], dl = delta[r];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float pj = exp_approx(pr[j] - li);
            pr[j] = pj;
            dr[j] = pj * (dr[j] - dl) * scale;
          }
          std::fill(pr + n, pr + np, 0.0f);
          std::fill(dr + n, dr + np, 0.0f);
        }
        // dq = ds k
        gemm(ds, m.sp, keys.kc, m.dp, dqb, m.dp, rows, m.dp, np, 1.0f,
             false);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(dqp + row0 + r * qstride, dqb + r * m.dp, m.d * sizeof(float));
        // dk += ds^T q, dv += p^T do
        gemm<true>(ds, m.sp, qb, m.dp, dka, m.dp, np, m.dp, rows, 1.0f,
                   true);
        gemm<true>(p, m.sp, dob, m.dp, dva, m.dp, np, m.dp, rows, 1.0f,
                   true);
      }
    }
    for (int64_t j = 0; j < m.s; ++j) {
      std::memcpy(dkp + key0 + j * kstride, dka + j * m.dp, m.d * sizeof(float));
      std::memcpy(dvp + key0 + j * kstride, dva + j * m.dp, m.d * sizeof(float));
    }
  };
  parallel_units(pool, m.batch * m.kv, unit);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // do
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale"));
