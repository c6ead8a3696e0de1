// A latency histogram for the benchmark's data thread: fixed log-linear buckets (exact below 64,
// then 64 sub-buckets per power of two, so any recorded value is known to within 1/64 = 1.6%),
// recording is a few integer operations and never allocates.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace vhostkit::bench {

class Histogram {
 public:
  static constexpr unsigned kSubBits = 6;
  static constexpr std::uint64_t kSub = std::uint64_t{1} << kSubBits;  // 64
  static constexpr std::size_t kBuckets = kSub + (64 - kSubBits) * kSub;

  static constexpr std::size_t bucket_of(std::uint64_t v) noexcept {
    if (v < kSub) return static_cast<std::size_t>(v);
    const unsigned exp = 63u - static_cast<unsigned>(std::countl_zero(v));  // >= kSubBits
    const std::uint64_t sub = (v >> (exp - kSubBits)) & (kSub - 1);
    return static_cast<std::size_t>(kSub + (exp - kSubBits) * kSub + sub);
  }
  // Smallest value that falls in bucket b, and how many values it spans.
  static constexpr std::uint64_t bucket_low(std::size_t b) noexcept {
    if (b < kSub) return b;
    const std::uint64_t exp = (b - kSub) / kSub + kSubBits;
    const std::uint64_t sub = (b - kSub) % kSub;
    return (kSub + sub) << (exp - kSubBits);
  }
  static constexpr std::uint64_t bucket_width(std::size_t b) noexcept {
    if (b < kSub) return 1;
    return std::uint64_t{1} << ((b - kSub) / kSub);
  }

  void record(std::uint64_t v) noexcept {
    ++counts_[bucket_of(v)];
    ++count_;
    sum_ += v;
    min_ = std::min(min_, v);
    max_ = std::max(max_, v);
  }
  void merge(const Histogram& o) noexcept {
    for (std::size_t b = 0; b < kBuckets; ++b) counts_[b] += o.counts_[b];
    count_ += o.count_;
    sum_ += o.sum_;
    min_ = std::min(min_, o.min_);
    max_ = std::max(max_, o.max_);
  }
  void reset() noexcept { *this = Histogram{}; }

  std::uint64_t count() const noexcept { return count_; }
  std::uint64_t min() const noexcept { return count_ ? min_ : 0; }
  std::uint64_t max() const noexcept { return max_; }
  double mean() const noexcept {
    return count_ ? static_cast<double>(sum_) / static_cast<double>(count_) : 0.0;
  }

  // The value below which a fraction q (0..1) of the samples lie: the middle of the bucket
  // holding the ceil(q * count)-th sample, clamped to [min, max] (so q = 0 gives min, q = 1 max).
  // 0 when empty.
  std::uint64_t percentile(double q) const noexcept {
    if (count_ == 0) return 0;
    if (!(q > 0.0)) return min_;
    if (q >= 1.0) return max_;
    const auto rank = std::max<std::uint64_t>(
        1, static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(count_))));
    std::uint64_t seen = 0;
    for (std::size_t b = 0; b < kBuckets; ++b) {
      seen += counts_[b];
      if (seen >= rank) {
        const std::uint64_t mid = bucket_low(b) + bucket_width(b) / 2;
        return std::clamp(mid, min_, max_);
      }
    }
    return max_;
  }

 private:
  std::array<std::uint64_t, kBuckets> counts_{};
  std::uint64_t count_ = 0;
  std::uint64_t sum_ = 0;
  std::uint64_t min_ = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t max_ = 0;
};

}  // namespace vhostkit::bench
