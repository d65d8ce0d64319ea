// Exact top-k inner-product search on a CPU, with the selection inside the product.
//
// Written by hand because no maintained library offers it: PyTorch has no fused matmul + top-k,
// and faiss's IndexFlatIP (a matmul per block, then heaps) is 2-3x slower than a plain matmul at
// these shapes (docs/benchmarks/search.md). Each task multiplies a tile of queries by a tile of
// keys into a buffer that stays in cache (PyTorch's own matmul, single-threaded inside the task),
// then reads the scores once, keeping each query's best k in a min-heap: a score below the heap's
// root, nearly every score after the first tiles, costs one comparison. The score matrix never
// reaches main memory, which PyTorch's separate passes over it (memory/exact.py) cannot avoid.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kRun = 32;  // scores compared with a heap's root at once

// Push (score, slot) into a min-heap of k entries rooted at scores[0], replacing the root.
inline void replace_root(float* scores, int64_t* slots, int64_t k, float score, int64_t slot) {
  int64_t parent = 0;
  while (true) {
    int64_t child = 2 * parent + 1;
    if (child >= k) break;
    if (child + 1 < k && scores[child + 1] < scores[child]) ++child;
    if (scores[child] >= score) break;
    scores[parent] = scores[child];
    slots[parent] = slots[child];
    parent = child;
  }
  scores[parent] = score;
  slots[parent] = slot;
}

}  // namespace

// queries (pairs, seq, dim) float32; keys (pairs, capacity, dim) of any float dtype, widened tile by tile;
// valid (rows, capacity) bool or an empty tensor for "every slot below extent", pair p reading row p / heads.
// Returns scores (pairs, seq, k) float32 best first (ties by slot), -inf where fewer than k entries exist,
// and slots (pairs, seq, k) long (0 there). Slots [0, extent) are searched in `chunks` ranges, each with
// heaps of its own, merged at the end: more tasks than (pair, query tile) pairs when those are few.
std::vector<torch::Tensor> topk_inner_product(
    const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& valid, int64_t heads,
    int64_t extent, int64_t k, int64_t query_tile, int64_t slot_tile, int64_t chunks) {
  TORCH_CHECK(queries.dim() == 3 && keys.dim() == 3 && queries.size(0) == keys.size(0), "bad shapes");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat && queries.is_contiguous(), "queries: contiguous float32");
  TORCH_CHECK(k > 0 && extent <= keys.size(1) && query_tile > 0 && slot_tile > 0 && chunks > 0, "bad sizes");
  const int64_t pairs = queries.size(0), seq = queries.size(1), dim = queries.size(2);
  const int64_t query_tiles = (seq + query_tile - 1) / query_tile;
  const int64_t slot_tiles = (extent + slot_tile - 1) / slot_tile;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, (slot_tiles + chunks - 1) / chunks);
  const bool masked = valid.numel() > 0;
  const bool* valid_data = masked ? valid.data_ptr<bool>() : nullptr;
  const int64_t valid_stride = masked ? valid.stride(0) : 0;
  const float lowest = -std::numeric_limits<float>::infinity();
  auto heap_scores = torch::full({chunks, pairs, seq, k}, lowest, queries.options());
  auto heap_slots = torch::zeros({chunks, pairs, seq, k}, queries.options().dtype(torch::kLong));
  float* all_scores = heap_scores.data_ptr<float>();
  int64_t* all_slots = heap_slots.data_ptr<int64_t>();

  at::parallel_for(0, chunks * pairs * query_tiles, 1, [&](int64_t begin, int64_t end) {
    auto buffer = torch::empty({query_tile * slot_tile}, queries.options());  // (query tile, slot tile) scores
    auto widened = torch::empty({slot_tile, dim}, queries.options());  // a tile of low-precision keys in float32
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / (pairs * query_tiles), pair = task / query_tiles % pairs;
      const int64_t first_query = task % query_tiles * query_tile;
      const int64_t rows = std::min(query_tile, seq - first_query);
      auto tile_queries = queries[pair].narrow(0, first_query, rows);  // (rows, dim)
      auto pair_keys = keys[pair];  // (capacity, dim)
      const bool* ok = masked ? valid_data + (pair / heads) * valid_stride : nullptr;
      const int64_t offset = (chunk * pairs + pair) * seq + first_query;  // the first query's heap
      float* best = all_scores + offset * k;
      int64_t* where = all_slots + offset * k;
      const int64_t stop = std::min(extent, (chunk + 1) * tiles_per_chunk * slot_tile);
      for (int64_t start = chunk * tiles_per_chunk * slot_tile; start < stop; start += slot_tile) {
        const int64_t width = std::min(slot_tile, stop - start);
        auto tile_keys = pair_keys.narrow(0, start, width);  // (width, dim)
        if (tile_keys.scalar_type() != torch::kFloat) {
          tile_keys = widened.narrow(0, 0, width).copy_(tile_keys);
        }
        auto scores = buffer.narrow(0, 0, rows * width).view({rows, width});
        at::mm_out(scores, tile_queries, tile_keys.t());
        const float* score = scores.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          float* heap = best + i * k;
          int64_t* heap_slot = where + i * k;
          const float* row = score + i * width;
          float root = heap[0];
          // Runs of kRun scores are first counted against the root, a loop the compiler vectorises; only a
          // run with a score above it (rare after the first tiles) is read again one score at a time.
          for (int64_t j = 0; j < width; j += kRun) {
            const int64_t end = std::min(width, j + kRun);
            int hits = 0;
            for (int64_t t = j; t < end; ++t) hits += row[t] > root;
            if (hits == 0) continue;
            for (int64_t t = j; t < end; ++t) {
              if (row[t] > root && (!masked || ok[start + t])) {
                replace_root(heap, heap_slot, k, row[t], start + t);
                root = heap[0];
              }
            }
          }
        }
      }
    }
  });

  // Merge each query's heaps across chunks, best first; ties in slot order.
  auto out_scores = torch::empty({pairs, seq, k}, queries.options());
  auto out_slots = torch::empty({pairs, seq, k}, heap_slots.options());
  float* result_scores = out_scores.data_ptr<float>();
  int64_t* result_slots = out_slots.data_ptr<int64_t>();
  at::parallel_for(0, pairs * seq, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(chunks * k);
    std::vector<float> candidate_scores(chunks * k);
    std::vector<int64_t> candidate_slots(chunks * k);
    for (int64_t query = begin; query < end; ++query) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t from = (chunk * pairs * seq + query) * k;
        std::copy(all_scores + from, all_scores + from + k, candidate_scores.begin() + chunk * k);
        std::copy(all_slots + from, all_slots + from + k, candidate_slots.begin() + chunk * k);
      }
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        if (candidate_scores[a] != candidate_scores[b]) return candidate_scores[a] > candidate_scores[b];
        return candidate_slots[a] < candidate_slots[b];
      });
      for (int64_t i = 0; i < k; ++i) {
        const bool found = candidate_scores[order[i]] > lowest;
        result_scores[query * k + i] = candidate_scores[order[i]];
        result_slots[query * k + i] = found ? candidate_slots[order[i]] : 0;
      }
    }
  });
  return {out_scores, out_slots};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("topk_inner_product", &topk_inner_product, "Exact top-k inner products, selected inside the product",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
