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

// For each output row u (ascending, covering every slot read): the sum of
// weights[read] * grad_out[token of read] over the row's reads, and, when table is given,
// each read's weight gradient grad_out[token] . table[row], in one pass over the row's reads.
// Reads are given sorted by slot: order[k] is the flat read index of the k-th sorted read and
// starts[u] the first sorted read of row u (row u's reads end where row u+1's start).
std::vector<at::Tensor> row_gradients(at::Tensor order, at::Tensor starts, at::Tensor rows,
                                      at::Tensor weights, at::Tensor grad_out,
                                      c10::optional<at::Tensor> table, int64_t per_bag) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.is_contiguous(), "grad_out: contiguous 2-D");
  TORCH_CHECK(order.scalar_type() == at::kLong && starts.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong, "order, starts and rows: int64");
  order = order.contiguous();
  starts = starts.contiguous();
  rows = rows.contiguous();
  weights = weights.contiguous().to(grad_out.scalar_type());
  const int64_t n_rows = rows.numel(), n_reads = order.numel(), dim = grad_out.size(1);
  auto out = at::empty({n_rows, dim}, grad_out.options());
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
    const scalar_t b1 = beta1, b2 = beta2, lr = step_size, e = eps, bc2 = bias_correction2_sqrt;
    at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* gi = g + i * dim;
        bool read = false;
        for (int64_t j = 0; j < dim; ++j) read |= gi[j] != 0;
        if (!read) continue;
        const int64_t r = row[i];
        scalar_t* pi = p + r * dim;
        scalar_t* mi = m + r * dim;
        if (row_wise) {
          scalar_t sq = 0;
          for (int64_t j = 0; j < dim; ++j) sq += gi[j] * gi[j];
          scalar_t& vi = v[r];
          vi = vi * b2 + (1 - b2) * (sq / dim);
          const scalar_t denom = std::sqrt(vi) / bc2 + e;
          for (int64_t j = 0; j < dim; ++j) {
            mi[j] += (1 - b1) * (gi[j] - mi[j]);
            pi[j] -= lr * (mi[j] / denom);
          }
        } else {
          scalar_t* vi = v + r * dim;
          for (int64_t j = 0; j < dim; ++j) {
            mi[j] += (1 - b1) * (gi[j] - mi[j]);
            vi[j] = vi[j] * b2 + (1 - b2) * (gi[j] * gi[j]);
            pi[j] -= lr * (mi[j] / (std::sqrt(vi[j]) / bc2 + e));
          }
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
