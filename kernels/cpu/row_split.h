// Output rows of a one-row GEMV split across threads, 4 rows per task (the register tile),
// the last < 4 rows one at a time. quad(n) computes rows n..n+3, single(j) row j.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

template <class Quad, class Single>
inline void for_row_quads(int64_t N, Quad quad, Single single) {
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t * 4;
      if (n + 4 <= N) {
        quad(n);
      } else {
        for (int64_t j = n; j < N; ++j) single(j);
      }
    }
  });
}
