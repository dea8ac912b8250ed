// Fused CPU passes of the memory layer's backward and of LazyAdam. Each walks the rows once,
// in parallel over rows; the PyTorch compositions in values.py and optim.py are the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

// acc += w * g, and return t . g: the loops the compiler vectorizes (outside the dispatch
// macro, where a pragma may not appear).
template <typename T>
inline T axpy_dot(T* acc, const T* g, const T* t, T w, int64_t dim) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < dim; ++j) {
    acc[j] += w * g[j];
    dot += t[j] * g[j];
  }
  return dot;
}

template <typename T>
inline void axpy(T* acc, const T* g, T w, int64_t dim) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) acc[j] += w * g[j];
}

template <typename T>
inline bool all_zero(const T* g, int64_t dim) {
  int nonzero = 0;
#pragma omp simd reduction(| : nonzero)
  for (int64_t j = 0; j < dim; ++j) nonzero |= g[j] != 0;
  return !nonzero;
}

template <typename T>
inline T sum_of_squares(const T* g, int64_t dim) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < dim; ++j) sq += g[j] * g[j];
  return sq;
}

// Adam on one row: m, v <- moments with g; p -= lr * m / (sqrt(v) / bias_correction2 + eps).
template <typename T>
inline void adam_row(T* p, T* m, T* v, const T* g, int64_t dim, T b1, T b2, T lr, T inv_bc2, T e) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const T mj = m[j] + (1 - b1) * (g[j] - m[j]);
    const T vj = v[j] * b2 + (1 - b2) * (g[j] * g[j]);
    m[j] = mj;
    v[j] = vj;
    p[j] -= lr * (mj / (std::sqrt(vj) * inv_bc2 + e));
  }
}

// The same with one second moment for the row, already folded into lr_over_denom.
template <typename T>
inline void adam_row_wise(T* p, T* m, const T* g, int64_t dim, T b1, T lr_over_denom) {
#pragma omp simd
  for (int64_t j = 0; j < dim; ++j) {
    const T mj = m[j] + (1 - b1) * (g[j] - m[j]);
    m[j] = mj;
    p[j] -= lr_over_denom * mj;
  }
}

// For each output row u (ascending, covering every slot read): the sum of
// weights[read] * grad_out[token of read] over the row's reads, and, when table is given,
// each read's weight gradient grad_out[token] . table[row], in one pass over the row's reads.
// Reads are given sorted by slot: order[k] is the flat read index of the k-th sorted read and
// starts[u] the first sorted read of row u (row u's reads end where row u+1's start).
std::vector<at::Tensor> row_gradients(at::Tensor order, at::Tensor starts, at::Tensor rows,
                                      at::Tensor weights, at::Tensor grad_out,
                                      c10::optional<at::Tensor> table, int64_t per_bag,
                                      c10::optional<at::Tensor> out_buffer) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.is_contiguous(), "grad_out: contiguous 2-D");
  TORCH_CHECK(order.scalar_type() == at::kLong && starts.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong, "order, starts and rows: int64");
  order = order.contiguous();
  starts = starts.contiguous();
  rows = rows.contiguous();
  weights = weights.contiguous().to(grad_out.scalar_type());
  const int64_t n_rows = rows.numel(), n_reads = order.numel(), dim = grad_out.size(1);
  at::Tensor out;
  if (out_buffer.has_value()) {  // memory to reuse: every row of it is written below
    out = *out_buffer;
    TORCH_CHECK(out.is_contiguous() && out.scalar_type() == grad_out.scalar_type() &&
                    out.size(0) == n_rows && out.size(1) == dim, "out: contiguous (rows, dim)");
  } else {
    out = at::empty({n_rows, dim}, grad_out.options());
  }
  at::Tensor weight_grads;
  const bool with_table = table.has_value();
  if (with_table) {
    TORCH_CHECK(table->is_contiguous() && table->scalar_type() == grad_out.scalar_type() &&
                    table->size(1) == dim, "table: contiguous, grad_out's dtype and width");
    weight_grads = at::empty({n_reads}, grad_out.options());
  }
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "row_gradients", [&] {
    const int64_t* ord = order.data_ptr<int64_t>();
    const int64_t* start = starts.data_ptr<int64_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* t = with_table ? table->data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* wg = with_table ? weight_grads.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n_rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        scalar_t* acc = o + u * dim;
        for (int64_t j = 0; j < dim; ++j) acc[j] = 0;
        const int64_t stop = u + 1 < n_rows ? start[u + 1] : n_reads;
        const scalar_t* trow = with_table ? t + row[u] * dim : nullptr;
        for (int64_t k = start[u]; k < stop; ++k) {
          const int64_t read = ord[k];
          const scalar_t* gi = g + (read / per_bag) * dim;
          const scalar_t wi = w[read];
          if (with_table) {
            wg[read] = axpy_dot(acc, gi, trow, wi, dim);
          } else {
            axpy(acc, gi, wi, dim);
          }
        }
      }
    });
  });
  if (with_table) return {out, weight_grads};
  return {out};
}

// One Adam step of the given unique rows, in place; rows whose gradient is all zero were not
// read and are left alone. exp_avg_sq is (rows, dim), or (rows, 1) when row_wise.
void lazy_adam_rows(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor rows,
                    at::Tensor grad, double step_size, double beta1, double beta2, double eps,
                    double bias_correction2_sqrt, bool row_wise) {
  TORCH_CHECK(param.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
              "param and Adam state: contiguous");
  TORCH_CHECK(param.dim() == 2 && grad.dim() == 2 && grad.size(1) == param.size(1),
              "param and grad: 2-D with the same width");
  TORCH_CHECK(rows.scalar_type() == at::kLong, "rows: int64");
  grad = grad.contiguous().to(param.scalar_type());
  rows = rows.contiguous();
  const int64_t n_rows = rows.numel(), dim = param.size(1);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "lazy_adam_rows", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* row = rows.data_ptr<int64_t>();
    const scalar_t b1 = beta1, b2 = beta2, lr = step_size, e = eps;
    const scalar_t inv_bc2 = 1 / bias_correction2_sqrt;
    at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* gi = g + i * dim;
        if (all_zero(gi, dim)) continue;  // not read: left alone
        const int64_t r = row[i];
        if (row_wise) {
          scalar_t& vi = v[r];
          vi = vi * b2 + (1 - b2) * (sum_of_squares(gi, dim) / dim);
          const scalar_t denom = std::sqrt(vi) * inv_bc2 + e;
          adam_row_wise(p + r * dim, m + r * dim, gi, dim, b1, lr / denom);
        } else {
          adam_row(p + r * dim, m + r * dim, v + r * dim, gi, dim, b1, b2, lr, inv_bc2, e);
        }
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_gradients", &row_gradients);
  m.def("lazy_adam_rows", &lazy_adam_rows);
}
