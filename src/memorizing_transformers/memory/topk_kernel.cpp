// Top-k inner-product search on a CPU, with the selection inside the product: exact, and over inverted lists.
//
// Written by hand because no maintained library offers it: PyTorch has no fused matmul + top-k,
// and faiss's IndexFlatIP (a matmul per block, then heaps) is 2-3x slower than a plain matmul at
// these shapes (docs/benchmarks/search.md). Each task multiplies a few queries by a tile of keys
// into a buffer that stays in cache, then reads the scores once, keeping each query's best k
// candidates: a score below its k-th best so far, nearly every score after the first tiles, costs
// one vector comparison. The score matrix never reaches main memory, which PyTorch's separate
// passes over it (memory/exact.py) cannot avoid. faiss's IVF scan goes query by query, each key
// read alone; the IVF search here (memory/ivf.py) goes list by list, one product per list for
// all the queries that probe it.
//
// The products are small (an IVF list: a few queries by a few hundred keys), where a BLAS call
// spends more time packing its operands and dispatching than multiplying (MKL took 7.8 us for an
// 8 x 32 x 256 product that `block_product` below does in 1.2). Keys are therefore multiplied in
// the layout a register-blocked product reads directly, blocks of kBlock keys stored dimension by
// dimension: the IVF lists are kept so, and the exact search lays out each tile of keys so as it
// reads it. The product is compiled for AVX-512, AVX2 and the baseline, one picked at load time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define MT_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRoom = 4;  // a query's candidates held, in multiples of k, before they are cut to k
constexpr int64_t kRun = 32;  // scores appended at once from the first above a query's floor
constexpr int64_t kBlock = 16;  // keys of a list stored together, dimension by dimension
constexpr int64_t kRowGroup = 4;  // queries multiplied at once by a list's keys (the lists' products pad to it)

// Where the product reads key i's dimension d among keys laid out in blocks of kBlock keys, each block dimension by
// dimension: the layout of the IVF lists, and of the exact search's tiles.
constexpr int64_t block_offset(int64_t i, int64_t d, int64_t dim) {
  return (i / kBlock * dim + d) * kBlock + i % kBlock;
}

template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(4 * W), aligned(4), may_alias));  // W floats, from any float
};

// out (R, NB * kBlock), rows `stride` apart = queries (R, dim) x the keys of NB blocks (see block_offset), its
// R x NB * kBlock scores held in registers as vectors of W floats.
template <int W, int R, int NB>
__attribute__((always_inline)) inline void block_product(const float* __restrict queries, int64_t dim,
                                                         const float* __restrict keys, float* __restrict out,
                                                         int64_t stride) {
  typedef typename Lanes<W>::type Vector;
  constexpr int N = NB * kBlock / W;  // vectors in a row of scores
  Vector sums[R][N];
  for (int r = 0; r < R; ++r) for (int n = 0; n < N; ++n) sums[r][n] = Vector{};
  for (int64_t d = 0; d < dim; ++d) {
    Vector key[N];
    for (int n = 0; n < N; ++n) {
      key[n] = *reinterpret_cast<const Vector*>(keys + block_offset(n * W, d, dim));
    }
    for (int r = 0; r < R; ++r) {
      const float query = queries[r * dim + d];
      for (int n = 0; n < N; ++n) sums[r][n] += query * key[n];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) *reinterpret_cast<Vector*>(out + r * stride + n * W) = sums[r][n];
  }
}

// scores (rows, blocks * kBlock), rows `stride` apart = queries (rows, dim), rows a multiple of R, x `blocks` blocks
// of keys; R queries by NB blocks at a time.
template <int W, int R, int NB>
__attribute__((always_inline)) inline void blocked_product(const float* queries, int64_t rows, int64_t dim,
                                                           const float* keys, int64_t blocks, float* scores,
                                                           int64_t stride) {
  for (int64_t row = 0; row < rows; row += R) {
    int64_t block = 0;
    for (; block + NB <= blocks; block += NB) {
      block_product<W, R, NB>(queries + row * dim, dim, keys + block * dim * kBlock,
                              scores + row * stride + block * kBlock, stride);
    }
    for (; block < blocks; ++block) {
      block_product<W, R, 1>(queries + row * dim, dim, keys + block * dim * kBlock,
                             scores + row * stride + block * kBlock, stride);
    }
  }
}

// One build serves every x86 CPU: the product is compiled for AVX-512, AVX2 and the baseline, picked at load time.
using Product = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
#ifdef MT_X86_DISPATCH
__attribute__((target("avx512f"))) void product_avx512(const float* queries, int64_t rows, int64_t dim,
                                                       const float* keys, int64_t blocks, float* scores,
                                                       int64_t stride) {
  blocked_product<16, kRowGroup, 2>(queries, rows, dim, keys, blocks, scores, stride);
}
__attribute__((target("avx2,fma"))) void product_avx2(const float* queries, int64_t rows, int64_t dim,
                                                      const float* keys, int64_t blocks, float* scores,
                                                      int64_t stride) {
  blocked_product<8, kRowGroup, 1>(queries, rows, dim, keys, blocks, scores, stride);
}
#endif
void product_baseline(const float* queries, int64_t rows, int64_t dim, const float* keys, int64_t blocks,
                      float* scores, int64_t stride) {
  blocked_product<4, kRowGroup / 2, 1>(queries, rows, dim, keys, blocks, scores, stride);
}

// The first t in [from, width) with row[t] > floor, else width: the scan for the few scores a query keeps, most of
// the scores read (each compared once), 16, 8 or 4 at a time as the CPU allows.
using Scan = int64_t (*)(const float*, int64_t, int64_t, float);
int64_t scan_baseline(const float* row, int64_t from, int64_t width, float floor) {
  int64_t t = from;
#ifdef MT_X86_DISPATCH
  const __m128 bar = _mm_set1_ps(floor);
  for (; t + 4 <= width && !_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(row + t), bar)); t += 4) {}
#endif
  for (; t < width && !(row[t] > floor); ++t) {}
  return t;
}
#ifdef MT_X86_DISPATCH
__attribute__((target("avx512f"))) int64_t scan_avx512(const float* row, int64_t from, int64_t width, float floor) {
  const __m512 bar = _mm512_set1_ps(floor);
  int64_t t = from;
  for (; t + 16 <= width; t += 16) {
    const __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + t), bar, _CMP_GT_OQ);
    if (above) return t + __builtin_ctz(above);
  }
  return scan_baseline(row, t, width, floor);
}
__attribute__((target("avx2"))) int64_t scan_avx2(const float* row, int64_t from, int64_t width, float floor) {
  const __m256 bar = _mm256_set1_ps(floor);
  int64_t t = from;
  for (; t + 8 <= width; t += 8) {
    const int above = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + t), bar, _CMP_GT_OQ));
    if (above) return t + __builtin_ctz(above);
  }
  return scan_baseline(row, t, width, floor);
}
#endif

// The product and the scan compiled for each instruction set this CPU has, best first.
struct Instructions {
  std::string name;
  Product product;
  Scan scan;
};

std::vector<Instructions> supported() {
  std::vector<Instructions> sets;
#ifdef MT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) sets.push_back({"avx512", product_avx512, scan_avx512});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    sets.push_back({"avx2", product_avx2, scan_avx2});
  }
#endif
  sets.push_back({"baseline", product_baseline, scan_baseline});
  return sets;
}

Product list_product = supported().front().product;
Scan first_above = supported().front().scan;

// The best k entries offered to each of `queries` queries, in `sets` sets searched apart (the chunks of a search)
// and merged at the end. Kept loosely: an entry above a query's floor is appended to its buffer of kRoom x k (and
// kRun more), and a buffer too full for the next run of scores is cut to its best k, the floor rising to the k-th
// best score. An entry costs an append without a branch, where a heap of k costs a sift: many entries are kept when
// a query sees few keys (an IVF search's probed lists).
class Collector {
 public:
  Collector(int64_t sets, int64_t queries, int64_t k)
      : queries_(queries), k_(k), room_(kRoom * k + kRun), scores_(sets * queries * room_),
        slots_(sets * queries * room_),
        counts_(sets * queries, 0), floors_(sets * queries, -std::numeric_limits<float>::infinity()) {}

  // Offer a row of `width` scores to query `query` of set `set`, score t for slot slot_of(t) (-1: no entry there,
  // skipped). The row is scanned for a score above the floor (rare after the first keys), and the run of kRun scores
  // from there appended, each score moving the count on if it is kept.
  template <typename SlotOf>
  void offer(int64_t set, int64_t query, const float* row, int64_t width, SlotOf slot_of) {
    const int64_t at = set * queries_ + query;
    float* scores = scores_.data() + at * room_;
    int64_t* slots = slots_.data() + at * room_;
    for (int64_t j = first_above(row, 0, width, floors_[at]); j < width;
         j = first_above(row, j + kRun, width, floors_[at])) {
      const int64_t end = std::min(width, j + kRun);
      if (counts_[at] + (end - j) > room_) cut(at);  // the run may not fit: hold k, raising the floor
      const float kept_above = floors_[at];
      int64_t count = counts_[at];
      for (int64_t t = j; t < end; ++t) {  // without a branch: which scores are kept is unpredictable
        const int64_t slot = slot_of(t);
        scores[count] = row[t];
        slots[count] = slot;
        count += (row[t] > kept_above) & (slot >= 0);
      }
      counts_[at] = count;
    }
  }

  // Each query's best k over every set: scores (queries, k) float32 best first, ties in slot order, -inf where fewer
  // than k entries were found, and their slots (queries, k) long (0 there).
  std::vector<torch::Tensor> merge() const {
    const int64_t sets = static_cast<int64_t>(counts_.size()) / std::max<int64_t>(queries_, 1);
    auto out_scores = torch::full({queries_, k_}, -std::numeric_limits<float>::infinity());
    auto out_slots = torch::zeros({queries_, k_}, torch::kLong);
    float* result_scores = out_scores.data_ptr<float>();
    int64_t* result_slots = out_slots.data_ptr<int64_t>();
    at::parallel_for(0, queries_, 64, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<float, int64_t>> found;
      for (int64_t query = begin; query < end; ++query) {
        found.clear();
        for (int64_t set = 0; set < sets; ++set) {
          const int64_t at = set * queries_ + query;
          for (int64_t i = 0; i < counts_[at]; ++i) {
            found.emplace_back(scores_[at * room_ + i], slots_[at * room_ + i]);
          }
        }
        const int64_t kept = std::min<int64_t>(k_, found.size());
        std::partial_sort(found.begin(), found.begin() + kept, found.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);  // ties in slot order
        });
        for (int64_t i = 0; i < kept; ++i) {
          result_scores[query * k_ + i] = found[i].first;
          result_slots[query * k_ + i] = found[i].second;
        }
      }
    });
    return {out_scores, out_slots};
  }

 private:
  // Cut buffer `at` (holding more than k) to its best k (ties to the lower slots), and raise its floor to the k-th
  // best score.
  void cut(int64_t at) {
    const int64_t count = counts_[at];
    thread_local std::vector<float> sorted;
    thread_local std::vector<int64_t> ties;
    float* scores = scores_.data() + at * room_;
    int64_t* slots = slots_.data() + at * room_;
    sorted.assign(scores, scores + count);
    std::nth_element(sorted.begin(), sorted.begin() + k_ - 1, sorted.end(), std::greater<float>());
    const float floor = sorted[k_ - 1];
    ties.resize(count);
    int64_t kept = 0, tied = 0;  // entries above the floor move to the front, the slots of those at it aside
    for (int64_t i = 0; i < count; ++i) {  // without a branch: which entries stay is unpredictable
      const float score = scores[i];
      const int64_t slot = slots[i];
      scores[kept] = score;
      slots[kept] = slot;
      kept += score > floor;
      ties[tied] = slot;
      tied += score == floor;
    }
    std::sort(ties.begin(), ties.begin() + tied);  // more than one only where scores tie
    for (int64_t i = 0; kept < k_; ++i) {
      scores[kept] = floor;
      slots[kept++] = ties[i];
    }
    counts_[at] = k_;
    floors_[at] = floor;
  }

  int64_t queries_, k_, room_;  // room: a query's buffer, kRoom x k + kRun
  std::vector<float> scores_;  // [(set * queries + query) * room + i]: a query's kept scores
  std::vector<int64_t> slots_;  // their slots
  std::vector<int64_t> counts_;  // [set * queries + query]: how many are kept
  std::vector<float> floors_;  // the score an entry must beat to be kept
};

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Resize `items` to `size`, reserving an eighth more (at least `step`) when it must grow: the IVF lists hold a copy
// of a memory's keys, and std::vector's doubling would leave up to as much again allocated and unused.
template <typename T>
void grow(std::vector<T>& items, size_t size, size_t step) {
  if (size > items.capacity()) items.reserve(size + std::max(size / 8, step));
  items.resize(size);
}

// Tasks [0, count) on PyTorch's threads: `body(next)` runs once on each thread, and next() gives it the next task
// not yet taken (-1 when none is left). Tasks differ in cost (a memory's rows fill unequally, lists differ in size),
// and at::parallel_for would give each thread a fixed range of them.
template <typename Body>
void dynamic_for(int64_t count, Body body) {
  std::atomic<int64_t> taken{0};
  auto next = [&] {
    const int64_t task = taken++;
    return task < count ? task : int64_t{-1};
  };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) { body(next); });
}

}  // namespace

// queries (pairs, seq, dim) float32; keys (pairs, capacity, dim) of any float dtype, widened tile by tile;
// valid (rows, capacity) bool or an empty tensor for "every slot below extent", pair p reading row p / heads.
// Returns scores (pairs, seq, k) float32 best first (ties by slot), -inf where fewer than k entries exist,
// and slots (pairs, seq, k) long (0 there). Slots [0, extent) are searched in `chunks` ranges, each with
// candidates of its own, merged at the end: more tasks than (pair, query tile) pairs when those are few.
std::vector<torch::Tensor> topk_inner_product(
    const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& valid, int64_t heads,
    int64_t extent, int64_t k, int64_t query_tile, int64_t slot_tile, int64_t chunks) {
  TORCH_CHECK(queries.dim() == 3 && keys.dim() == 3 && queries.size(0) == keys.size(0), "bad shapes");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat && queries.is_contiguous(), "queries: contiguous float32");
  TORCH_CHECK(keys.stride(2) == 1, "keys: each key's numbers contiguous");
  TORCH_CHECK(k > 0 && extent <= keys.size(1) && query_tile > 0 && slot_tile > 0 && chunks > 0, "bad sizes");
  const int64_t pairs = queries.size(0), seq = queries.size(1), dim = queries.size(2);
  const int64_t query_tiles = (seq + query_tile - 1) / query_tile;
  const int64_t slot_tiles = (extent + slot_tile - 1) / slot_tile;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, (slot_tiles + chunks - 1) / chunks);
  const bool masked = valid.numel() > 0;
  const bool* valid_data = masked ? valid.data_ptr<bool>() : nullptr;
  const int64_t valid_stride = masked ? valid.stride(0) : 0;
  Collector best(chunks, pairs * seq, k);

  const int64_t tile_width = round_up(slot_tile, kBlock), key_stride = keys.stride(1);
  dynamic_for(chunks * pairs * query_tiles, [&](auto next) {
    std::vector<float> tile_queries(round_up(query_tile, kRowGroup) * dim);  // in whole groups of kRowGroup
    std::vector<float> tile_keys(tile_width * dim);  // a tile of keys in float32, in blocks (see InvertedLists)
    std::vector<float> buffer(round_up(query_tile, kRowGroup) * tile_width);  // their scores
    for (int64_t task = next(); task >= 0; task = next()) {
      const int64_t chunk = task / (pairs * query_tiles), pair = task / query_tiles % pairs;
      const int64_t first_query = task % query_tiles * query_tile;
      const int64_t rows = std::min(query_tile, seq - first_query);
      std::copy_n(queries.data_ptr<float>() + (pair * seq + first_query) * dim, rows * dim, tile_queries.data());
      const bool* ok = masked ? valid_data + (pair / heads) * valid_stride : nullptr;
      const int64_t stop = std::min(extent, (chunk + 1) * tiles_per_chunk * slot_tile);
      for (int64_t start = chunk * tiles_per_chunk * slot_tile; start < stop; start += slot_tile) {
        const int64_t width = std::min(slot_tile, stop - start), blocks = (width + kBlock - 1) / kBlock;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "block", [&] {
          const scalar_t* from = keys.data_ptr<scalar_t>() + pair * keys.stride(0) + start * key_stride;
          for (int64_t i = 0; i < width; ++i) {
            for (int64_t d = 0; d < dim; ++d) {
              tile_keys[block_offset(i, d, dim)] = static_cast<float>(from[i * key_stride + d]);
            }
          }
        });
        const int64_t stride = blocks * kBlock;
        list_product(tile_queries.data(), round_up(rows, kRowGroup), dim, tile_keys.data(), blocks, buffer.data(),
                     stride);
        for (int64_t i = 0; i < rows; ++i) {
          best.offer(chunk, pair * seq + first_query + i, buffer.data() + i * stride, width,
                     [&](int64_t t) { return !masked || ok[start + t] ? start + t : int64_t{-1}; });
        }
      }
    }
  });

  auto found = best.merge();
  return {found[0].view({pairs, seq, k}), found[1].view({pairs, seq, k})};
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
// together, in the store's dtype, with their slots, so that a list is scanned as one product. faiss's IVF lists
// are scanned query by query, each key read alone; here each list is multiplied at once by every query that
// probes it, and the scores offered to those queries. A list's keys are stored in blocks of kBlock keys, each
// block dimension by dimension (block_offset), the layout `list_product` reads; the last block's unused columns
// are multiplied too, and their scores never offered. A slot moves between lists as it is written: it leaves its
// list (the list's last entry takes its place) and joins the end of its new one.
class InvertedLists {
 public:
  InvertedLists(int64_t pairs, int64_t lists, int64_t capacity, int64_t dim, at::ScalarType dtype)
      : pairs_(pairs), lists_(lists), capacity_(capacity), dim_(dim), dtype_(dtype),
        element_bytes_(c10::elementSize(dtype)), row_bytes_(dim * element_bytes_), slots_(pairs * lists),
        keys_(pairs * lists),
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
      const int64_t position = static_cast<int64_t>(slots_[id].size());
      position_[p * capacity_ + s] = position;
      list_of_[p * capacity_ + s] = l;
      grow(slots_[id], position + 1, kBlock);
      slots_[id][position] = s;
      if (position % kBlock == 0) grow(keys_[id], keys_[id].size() + kBlock * row_bytes_, kBlock * row_bytes_);
      for (int64_t d = 0; d < dim_; ++d) {
        const char* number = bytes + i * row_bytes_ + d * element_bytes_;
        std::copy_n(number, element_bytes_, keys_[id].data() + offset_of(position, d));
      }
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
  // (negative: none). A list's keys are multiplied `slot_tile` at a time (rounded up to whole blocks). The lists are
  // cut into `chunks` ranges, each with candidates of its own, merged at the end. Returns
  // their scores (pairs, seq, k) float32, the keys' products in float32, best first (ties by slot), -inf where fewer
  // than k were found, and their slots (pairs, seq, k) long (0 there).
  std::vector<torch::Tensor> search(const torch::Tensor& queries, const torch::Tensor& probes, int64_t k,
                                    int64_t slot_tile, int64_t chunks) const {
    TORCH_CHECK(queries.dim() == 3 && queries.size(0) == pairs_ && queries.size(2) == dim_,
                "queries: (pairs, seq, dim)");
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
    const int64_t tile_width = round_up(slot_tile, kBlock);
    Collector best(chunks, pairs_ * seq, k);
    const float* query_data = queries.data_ptr<float>();

    dynamic_for(chunks * pairs_, [&](auto next) {
      // The queries probing a list, in whole groups of kRowGroup (the last group's other rows: earlier queries).
      std::vector<float> tile_queries(round_up(seq, kRowGroup) * dim_);
      std::vector<float> tile_keys(tile_width * dim_);  // a tile of its keys, in float32 (for other dtypes)
      std::vector<float> buffer(round_up(seq, kRowGroup) * tile_width);  // their scores
      std::vector<int64_t> asking(seq);  // the queries probing the list
      for (int64_t task = next(); task >= 0; task = next()) {
        const int64_t chunk = task / pairs_, pair = task % pairs_;
        const int64_t* prober = probers[pair].data_ptr<int64_t>();
        const int64_t* prober_bound = prober_bounds[pair].data_ptr<int64_t>();
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
          for (int64_t i = 0; i < rows; ++i) {
            std::copy_n(query_data + (pair * seq + asking[i]) * dim_, dim_, tile_queries.data() + i * dim_);
          }
          const char* list_keys = keys_[pair * lists_ + list].data();
          for (int64_t first = 0; first < size; first += tile_width) {  // first: a multiple of kBlock
            const int64_t width = std::min(tile_width, size - first), blocks = (width + kBlock - 1) / kBlock;
            const float* keys = tile(list_keys + first * row_bytes_, blocks * kBlock, tile_keys);
            const int64_t stride = blocks * kBlock;  // (rows, stride) scores
            list_product(tile_queries.data(), round_up(rows, kRowGroup), dim_, keys, blocks, buffer.data(), stride);
            const int64_t* slots = members.data() + first;
            for (int64_t i = 0; i < rows; ++i) {
              best.offer(chunk, pair * seq + asking[i], buffer.data() + i * stride, width,
                         [&](int64_t t) { return slots[t]; });
            }
          }
        }
      }
    });
    auto found = best.merge();
    return {found[0].view({pairs_, seq, k}), found[1].view({pairs_, seq, k})};
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
      for (int64_t d = 0; d < dim_; ++d) {
        std::copy_n(keys.data() + offset_of(last, d), element_bytes_, keys.data() + offset_of(position, d));
      }
    }
    slots.pop_back();
    if (last % kBlock == 0) keys.resize(last * row_bytes_);  // its last block is empty
    list_of_[at] = -1;
  }

  // Where key `position` of a list has its dimension d: a byte offset into the list's keys.
  int64_t offset_of(int64_t position, int64_t d) const {
    return block_offset(position, d, dim_) * element_bytes_;
  }

  // `count` keys (whole blocks) of the lists' dtype at `bytes`, in float32: the bytes themselves for float32, else
  // widened into `target`.
  const float* tile(const char* bytes, int64_t count, std::vector<float>& target) const {
    if (dtype_ == torch::kFloat) return reinterpret_cast<const float*>(bytes);
    float* out = target.data();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype_, "tile", [&] {
      const scalar_t* in = reinterpret_cast<const scalar_t*>(bytes);
      for (int64_t i = 0; i < count * dim_; ++i) out[i] = static_cast<float>(in[i]);
    });
    return out;
  }

  int64_t pairs_, lists_, capacity_, dim_;
  at::ScalarType dtype_;
  int64_t element_bytes_, row_bytes_;  // one number's bytes, one key's
  std::vector<std::vector<int64_t>> slots_;  // [pair * lists + list]: the list's slots
  std::vector<std::vector<char>> keys_;  // [pair * lists + list]: their keys, in blocks (see above)
  std::vector<int64_t> list_of_;  // [pair * capacity + slot]: the slot's list, -1 for none
  std::vector<int64_t> position_;  // [pair * capacity + slot]: its place in that list
};

// The instruction sets the kernel can use on this CPU, best first: the first is used unless told otherwise.
std::vector<std::string> instruction_sets() {
  std::vector<std::string> names;
  for (const Instructions& set : supported()) names.push_back(set.name);
  return names;
}

// Use the product and scan of one of `instruction_sets()`, so that the tests check each on a CPU that has it.
void use_instructions(const std::string& name) {
  for (const Instructions& set : supported()) {
    if (set.name == name) {
      list_product = set.product;
      first_above = set.scan;
      return;
    }
  }
  TORCH_CHECK(false, "no instruction set ", name, " on this CPU");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("instruction_sets", &instruction_sets, "The instruction sets usable here, best (the default) first");
  module.def("use_instructions", &use_instructions, "Search with the product and scan of this instruction set");
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
