// Top-k inner-product search on a CPU, with the selection inside the product: exact, and over inverted lists.
//
// Written by hand because no maintained library offers it: PyTorch has no fused matmul + top-k,
// and faiss's IndexFlatIP (a matmul per block, then heaps) is 2-3x slower than a plain matmul at
// these shapes (docs/benchmarks/search.md). Each task multiplies a tile of queries by a tile of
// keys into a buffer that stays in cache (PyTorch's own matmul, single-threaded inside the task),
// then reads the scores once, keeping each query's best k in a min-heap: a score below the heap's
// root, nearly every score after the first tiles, costs one comparison. The score matrix never
// reaches main memory, which PyTorch's separate passes over it (memory/exact.py) cannot avoid.
// faiss's IVF scan goes query by query, each key read alone; the IVF search here (memory/ivf.py)
// goes list by list, one product per list for all the queries that probe it.

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

// Offer a row of `width` scores to a query's min-heap of k entries (scores, slots), score t for slot slot_of(t)
// (-1: no entry there, skipped). Runs of kRun scores are first counted against the root, a loop the compiler
// vectorises; only a run with a score above it (rare after the first tiles) is read again one score at a time.
template <typename SlotOf>
inline void offer(float* heap, int64_t* heap_slot, int64_t k, const float* row, int64_t width, SlotOf slot_of) {
  float root = heap[0];
  for (int64_t j = 0; j < width; j += kRun) {
    const int64_t end = std::min(width, j + kRun);
    int hits = 0;
    for (int64_t t = j; t < end; ++t) hits += row[t] > root;
    if (hits == 0) continue;
    for (int64_t t = j; t < end; ++t) {
      if (row[t] <= root) continue;
      const int64_t slot = slot_of(t);
      if (slot < 0) continue;
      replace_root(heap, heap_slot, k, row[t], slot);
      root = heap[0];
    }
  }
}

// Each query's heaps of k, one per chunk (chunks, ..., k), merged into its best k (..., k), best first and ties
// in slot order; -inf and slot 0 where fewer than k entries were found.
std::vector<torch::Tensor> merge(const torch::Tensor& heap_scores, const torch::Tensor& heap_slots, int64_t k) {
  const int64_t chunks = heap_scores.size(0), queries = heap_scores[0].numel() / k;
  const float lowest = -std::numeric_limits<float>::infinity();
  const float* all_scores = heap_scores.data_ptr<float>();
  const int64_t* all_slots = heap_slots.data_ptr<int64_t>();
  auto out_scores = torch::empty_like(heap_scores[0]);
  auto out_slots = torch::empty_like(heap_slots[0]);
  float* result_scores = out_scores.data_ptr<float>();
  int64_t* result_slots = out_slots.data_ptr<int64_t>();
  at::parallel_for(0, queries, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(chunks * k);
    std::vector<float> candidate_scores(chunks * k);
    std::vector<int64_t> candidate_slots(chunks * k);
    for (int64_t query = begin; query < end; ++query) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t from = (chunk * queries + query) * k;
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
          offer(best + i * k, where + i * k, k, score + i * width, width,
                [&](int64_t t) { return !masked || ok[start + t] ? start + t : int64_t{-1}; });
        }
      }
    }
  });

  return merge(heap_scores, heap_slots, k);
}

// Items 0..n-1 sorted by their group (groups[i] in [0, count), or negative: left out), stably: bounds (count + 1)
// with group g's items at order[bounds[g], bounds[g + 1]).
void group_by(const int64_t* groups, int64_t n, int64_t count, int64_t* bounds, int64_t* order) {
  std::fill(bounds, bounds + count + 1, 0);
  for (int64_t i = 0; i < n; ++i) if (groups[i] >= 0) ++bounds[groups[i] + 1];
  std::partial_sum(bounds, bounds + count + 1, bounds);
  std::vector<int64_t> next(bounds, bounds + count);
  for (int64_t i = 0; i < n; ++i) if (groups[i] >= 0) order[next[groups[i]]++] = i;
}

// The inverted lists of an IVF index, one set of `lists` per (row, head) pair of a memory: each list's keys held
// contiguous, in the store's dtype, with their slots, so that a list is scanned as one product. faiss's IVF lists
// are scanned query by query, each key read alone; here each list is multiplied at once by every query that
// probes it, and the scores offered to those queries' heaps. A slot moves between lists as it is written: it
// leaves its list (the list's last entry takes its place) and joins the end of its new one.
class InvertedLists {
 public:
  InvertedLists(int64_t pairs, int64_t lists, int64_t capacity, int64_t dim, at::ScalarType dtype)
      : pairs_(pairs), lists_(lists), capacity_(capacity), dim_(dim), dtype_(dtype),
        row_bytes_(dim * c10::elementSize(dtype)), slots_(pairs * lists), keys_(pairs * lists),
        list_of_(pairs * capacity, -1), position_(pairs * capacity, -1) {
    TORCH_CHECK(pairs > 0 && lists > 0 && capacity > 0 && dim > 0, "bad sizes");
  }

  // File keys (n, dim) of the store's dtype at (pairs[i], slots[i]) in lists[i], each leaving its list if it had one.
  void assign(const torch::Tensor& pairs, const torch::Tensor& slots, const torch::Tensor& lists,
              const torch::Tensor& keys) {
    TORCH_CHECK(keys.scalar_type() == dtype_ && keys.is_contiguous() && keys.dim() == 2 && keys.size(1) == dim_,
                "keys: contiguous (n, dim) in the lists' dtype");
    const int64_t n = keys.size(0);
    TORCH_CHECK(pairs.numel() == n && slots.numel() == n && lists.numel() == n, "one pair, slot and list per key");
    auto pair = pairs.to(torch::kLong).contiguous(), slot = slots.to(torch::kLong).contiguous();
    auto list = lists.to(torch::kLong).contiguous();
    const char* bytes = static_cast<const char*>(keys.data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = pair.data_ptr<int64_t>()[i], s = slot.data_ptr<int64_t>()[i], l = list.data_ptr<int64_t>()[i];
      TORCH_CHECK(0 <= p && p < pairs_ && 0 <= s && s < capacity_ && 0 <= l && l < lists_, "index out of range");
      remove(p, s);
      const int64_t id = p * lists_ + l;
      position_[p * capacity_ + s] = static_cast<int64_t>(slots_[id].size());
      list_of_[p * capacity_ + s] = l;
      slots_[id].push_back(s);
      keys_[id].insert(keys_[id].end(), bytes + i * row_bytes_, bytes + (i + 1) * row_bytes_);
    }
  }

  // Empty every list of these pairs (long (m,)).
  void clear(const torch::Tensor& pairs) {
    auto pair = pairs.to(torch::kLong).contiguous();
    for (int64_t i = 0; i < pair.numel(); ++i) {
      const int64_t p = pair.data_ptr<int64_t>()[i];
      TORCH_CHECK(0 <= p && p < pairs_, "pair out of range");
      for (int64_t l = 0; l < lists_; ++l) {
        slots_[p * lists_ + l].clear();
        keys_[p * lists_ + l].clear();
      }
      std::fill(list_of_.begin() + p * capacity_, list_of_.begin() + (p + 1) * capacity_, -1);
    }
  }

  // New lists whose pair i is a copy of this one's pair pairs[i] (long (m,), pairs may repeat).
  InvertedLists select(const torch::Tensor& pairs) const {
    auto pair = pairs.to(torch::kLong).contiguous();
    const int64_t count = pair.numel();
    TORCH_CHECK(count > 0, "select at least one pair");
    InvertedLists selected(count, lists_, capacity_, dim_, dtype_);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = pair.data_ptr<int64_t>()[i];
      TORCH_CHECK(0 <= p && p < pairs_, "pair out of range");
      std::copy_n(slots_.begin() + p * lists_, lists_, selected.slots_.begin() + i * lists_);
      std::copy_n(keys_.begin() + p * lists_, lists_, selected.keys_.begin() + i * lists_);
      std::copy_n(list_of_.begin() + p * capacity_, capacity_, selected.list_of_.begin() + i * capacity_);
      std::copy_n(position_.begin() + p * capacity_, capacity_, selected.position_.begin() + i * capacity_);
    }
    return selected;
  }

  // Entries held per pair: (pairs,) long.
  torch::Tensor sizes() const {
    auto out = torch::zeros({pairs_}, torch::kLong);
    for (int64_t id = 0; id < pairs_ * lists_; ++id) out.data_ptr<int64_t>()[id / lists_] += slots_[id].size();
    return out;
  }

  // Each slot's list, -1 where it holds no entry: (pairs, capacity) long.
  torch::Tensor lists_of() const { return torch::tensor(list_of_).view({pairs_, capacity_}); }

  // The best k entries of the probed lists for queries (pairs, seq, dim) float32, probes (pairs, seq, nprobe) long
  // (negative: none). The lists are cut into `chunks` ranges, each with heaps of its own, merged at the end. Returns
  // their scores (pairs, seq, k) float32, the keys' products in float32, best first (ties by slot), -inf where fewer
  // than k were found, and their slots (pairs, seq, k) long (0 there).
  std::vector<torch::Tensor> search(const torch::Tensor& queries, const torch::Tensor& probes, int64_t k,
                                    int64_t slot_tile, int64_t chunks) const {
    TORCH_CHECK(queries.dim() == 3 && queries.size(0) == pairs_ && queries.size(2) == dim_, "queries: (pairs, seq, dim)");
    TORCH_CHECK(queries.scalar_type() == torch::kFloat && queries.is_contiguous(), "queries: contiguous float32");
    TORCH_CHECK(probes.scalar_type() == torch::kLong && probes.is_contiguous() && probes.size(0) == pairs_ &&
                probes.size(1) == queries.size(1), "probes: contiguous (pairs, seq, nprobe) long");
    TORCH_CHECK(probes.numel() == 0 || probes.max().item<int64_t>() < lists_, "probes: lists out of range");
    TORCH_CHECK(k > 0 && slot_tile > 0 && chunks > 0, "bad sizes");
    const int64_t seq = queries.size(1), nprobe = probes.size(2);
    // Per pair, its (query, probe) entries grouped by the list probed.
    auto prober_bounds = torch::empty({pairs_, lists_ + 1}, probes.options());
    auto probers = torch::empty({pairs_, seq * nprobe}, probes.options());
    at::parallel_for(0, pairs_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        group_by(probes[pair].data_ptr<int64_t>(), seq * nprobe, lists_, prober_bounds[pair].data_ptr<int64_t>(),
                 probers[pair].data_ptr<int64_t>());
      }
    });
    const int64_t lists_per_chunk = (lists_ + chunks - 1) / chunks;
    auto heap_scores = torch::full({chunks, pairs_, seq, k}, -std::numeric_limits<float>::infinity(),
                                   queries.options());
    auto heap_slots = torch::zeros({chunks, pairs_, seq, k}, probes.options());
    const float* query_data = queries.data_ptr<float>();

    at::parallel_for(0, chunks * pairs_, 1, [&](int64_t begin, int64_t end) {
      auto tile_queries = torch::empty({seq, dim_}, queries.options());  // the queries probing a list
      auto tile_keys = torch::empty({slot_tile, dim_}, queries.options());  // a tile of its keys, in float32
      auto buffer = torch::empty({seq * slot_tile}, queries.options());  // their scores
      std::vector<int64_t> asking(seq);  // the queries probing the list
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task / pairs_, pair = task % pairs_;
        const int64_t* prober = probers[pair].data_ptr<int64_t>();
        const int64_t* prober_bound = prober_bounds[pair].data_ptr<int64_t>();
        float* best = heap_scores[chunk][pair].data_ptr<float>();
        int64_t* where = heap_slots[chunk][pair].data_ptr<int64_t>();
        const int64_t stop = std::min(lists_, (chunk + 1) * lists_per_chunk);
        for (int64_t list = chunk * lists_per_chunk; list < stop; ++list) {
          const std::vector<int64_t>& members = slots_[pair * lists_ + list];
          const int64_t size = static_cast<int64_t>(members.size());
          int64_t rows = 0;  // a query probing the list more than once asks once (its entries are adjacent)
          for (int64_t i = prober_bound[list]; i < prober_bound[list + 1] && size > 0; ++i) {
            const int64_t query = prober[i] / nprobe;
            if (rows == 0 || asking[rows - 1] != query) asking[rows++] = query;
          }
          if (rows == 0) continue;
          float* gathered = tile_queries.data_ptr<float>();
          for (int64_t i = 0; i < rows; ++i) {
            std::copy_n(query_data + (pair * seq + asking[i]) * dim_, dim_, gathered + i * dim_);
          }
          const char* list_keys = keys_[pair * lists_ + list].data();
          for (int64_t first = 0; first < size; first += slot_tile) {
            const int64_t width = std::min(slot_tile, size - first);
            auto keys = tile(list_keys + first * row_bytes_, width, tile_keys);  // (width, dim) float32
            auto scores = buffer.narrow(0, 0, rows * width).view({rows, width});
            at::mm_out(scores, tile_queries.narrow(0, 0, rows), keys.t());
            const float* score = scores.data_ptr<float>();
            const int64_t* slots = members.data() + first;
            for (int64_t i = 0; i < rows; ++i) {
              offer(best + asking[i] * k, where + asking[i] * k, k, score + i * width, width,
                    [&](int64_t t) { return slots[t]; });
            }
          }
        }
      }
    });
    return merge(heap_scores, heap_slots, k);
  }

 private:
  void remove(int64_t pair, int64_t slot) {
    const int64_t at = pair * capacity_ + slot, list = list_of_[at];
    if (list < 0) return;
    const int64_t id = pair * lists_ + list, position = position_[at];
    std::vector<int64_t>& slots = slots_[id];
    std::vector<char>& keys = keys_[id];
    const int64_t last = static_cast<int64_t>(slots.size()) - 1;
    if (position != last) {  // the list's last entry takes the leaving one's place
      slots[position] = slots[last];
      position_[pair * capacity_ + slots[last]] = position;
      std::copy_n(keys.data() + last * row_bytes_, row_bytes_, keys.data() + position * row_bytes_);
    }
    slots.pop_back();
    keys.resize(last * row_bytes_);
    list_of_[at] = -1;
  }

  // `count` keys of the lists' dtype at `bytes` as a float32 (count, dim) tensor: the bytes themselves for float32,
  // else widened into `target`.
  torch::Tensor tile(const char* bytes, int64_t count, torch::Tensor& target) const {
    if (dtype_ == torch::kFloat) {
      return torch::from_blob(const_cast<char*>(bytes), {count, dim_}, target.options());
    }
    float* out = target.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_, "tile", [&] {
      const scalar_t* in = reinterpret_cast<const scalar_t*>(bytes);
      for (int64_t i = 0; i < count * dim_; ++i) out[i] = static_cast<float>(in[i]);
    });
    return target.narrow(0, 0, count);
  }

  int64_t pairs_, lists_, capacity_, dim_;
  at::ScalarType dtype_;
  int64_t row_bytes_;  // one key's bytes
  std::vector<std::vector<int64_t>> slots_;  // [pair * lists + list]: the list's slots
  std::vector<std::vector<char>> keys_;  // [pair * lists + list]: their keys, row after row
  std::vector<int64_t> list_of_;  // [pair * capacity + slot]: the slot's list, -1 for none
  std::vector<int64_t> position_;  // [pair * capacity + slot]: its place in that list
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("topk_inner_product", &topk_inner_product, "Exact top-k inner products, selected inside the product",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<InvertedLists>(module, "InvertedLists")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, at::ScalarType>())
      .def("assign", &InvertedLists::assign, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("clear", &InvertedLists::clear, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("select", &InvertedLists::select, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("sizes", &InvertedLists::sizes)
      .def("lists_of", &InvertedLists::lists_of)
      .def("search", &InvertedLists::search, pybind11::call_guard<pybind11::gil_scoped_release>());
}
