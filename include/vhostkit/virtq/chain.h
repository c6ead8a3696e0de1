// What both ring layouts hand the device: a validated chain, or the reason one was refused.
// DeviceQueue (split) and PackedDeviceQueue (packed) share these types and the names of their
// methods, so a device can be written once as a template over the ring (the concepts below)
// with no virtual call on the data path.
#pragma once

#include <sys/uio.h>

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <expected>
#include <limits>
#include <span>

#include "vhostkit/memory/guest_memory.h"

namespace vhostkit::virtq {

// What was wrong with one chain. Errors marked (broken) stop the whole queue: after them the
// device can no longer tell which chains are real, so it stops serving the ring until reset.
// Errors marked (dropped) consume the chain without an answer: it has no buffer id the device
// may complete. Every other error answers the chain with used len 0.
enum class ChainError : std::uint8_t {
  queue_broken,             // the queue was marked broken earlier (broken)
  avail_idx_runaway,        // split: avail->idx moved more than the queue size at once (broken)
  head_out_of_range,        // split: the avail ring names a head >= queue size (broken)
  next_out_of_range,        // a next field >= the table's size
  chain_too_long,           // more descriptors than the queue size: also how loops end
  desc_not_mapped,          // a buffer outside guest memory
  desc_len_wraps,           // addr + len overflows 64 bits
  total_too_large,          // the chain's total length exceeds 4 GiB
  indirect_not_negotiated,  // INDIRECT flag without VIRTIO_F_RING_INDIRECT_DESC
  indirect_not_mapped,      // an indirect table outside guest memory
  indirect_bad_len,         // an indirect table of length 0 or not a multiple of 16
  indirect_nested,          // an indirect descriptor inside an indirect table
  indirect_with_next,       // INDIRECT and NEXT both set on one descriptor
  readable_after_writable,  // a device-readable buffer after a device-writable one
  too_many_segments,        // the caller's segment array is too small for this chain
  chain_unterminated,       // packed: a chain runs into a descriptor not made available, or
                            // over more than the queue size (broken)
  wrap_state_invalid,       // packed: a resume point past the ring or used ahead of avail (broken)
  id_out_of_range,          // packed: a buffer id >= queue size (dropped)
  id_in_flight,             // packed: a buffer id still in flight reused (dropped)
  indirect_in_chain,        // packed: an INDIRECT descriptor after NEXT ones (2.8.7 forbids)
  empty,                    // pop() with nothing available (a caller slip; not counted)
  kCount
};
inline constexpr std::size_t kChainErrorCount = static_cast<std::size_t>(ChainError::kCount);
const char* to_string(ChainError e) noexcept;
constexpr bool breaks_queue(ChainError e) noexcept {
  return e == ChainError::queue_broken || e == ChainError::avail_idx_runaway ||
         e == ChainError::head_out_of_range || e == ChainError::chain_unterminated ||
         e == ChainError::wrap_state_invalid;
}
// The chain was consumed but not answered (no used element carries it).
constexpr bool drops_chain(ChainError e) noexcept {
  return e == ChainError::id_out_of_range || e == ChainError::id_in_flight;
}

// A validated chain: host pieces of the device-readable part, then of the device-writable part.
// The spans point into the segment array the caller passed to pop(); valid until it is reused.
struct Chain {
  std::uint16_t head = 0;  // what push_used() takes: split, the head index; packed, the buffer id
  std::uint16_t desc_count = 0;  // descriptors walked (indirect ones included)
  std::span<iovec> readable;
  std::span<iovec> writable;
  std::uint64_t readable_len = 0;
  std::uint64_t writable_len = 0;
};

// The cache line the prefetches below and the data path's layout choices assume (x86-64, arm64).
inline constexpr std::size_t kCacheLine = 64;

namespace detail {
// One prefetch per kCacheLine-byte line of [p, p + len). Inline asm on x86-64: GCC -O3 dropped a
// __builtin_prefetch loop it judged to have no effect (inside the loopback's burst loop), and
// __builtin_prefetch(p, 1) gives PREFETCHT0, not PREFETCHW, unless built for a CPU that has it
// (every x86-64 CPU decodes PREFETCHW; older ones as a no-op).
template <bool ForWrite>
inline void prefetch_lines(const void* p, std::size_t len) noexcept {
  const auto start = reinterpret_cast<std::uintptr_t>(p);
  for (std::uintptr_t a = start & ~std::uintptr_t{kCacheLine - 1}; a < start + len;
       a += kCacheLine) {
#if defined(__x86_64__)
    if constexpr (ForWrite) {
      asm volatile("prefetchw %0" : : "m"(*reinterpret_cast<const char*>(a)));
    } else {
      asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(a)));
    }
#else
    __builtin_prefetch(reinterpret_cast<const void*>(a), ForWrite ? 1 : 0);
#endif
  }
}
}  // namespace detail

// Asks the cache for the lines of [p, p + len) ahead of stores into them: x86's PREFETCHW takes
// each line exclusive, so a store later finds it ready instead of waiting, at the head of the
// store buffer, for the other core to give it up. A hint: it faults on nothing.
inline void prefetch_for_write(const void* p, std::size_t len) noexcept {
  detail::prefetch_lines<true>(p, len);
}

// Asks the cache for the lines of [p, p + len) ahead of loads from them. A hint.
inline void prefetch_for_read(const void* p, std::size_t len) noexcept {
  detail::prefetch_lines<false>(p, len);
}

// The device side of either layout, as the vhost and net layers use it.
template <class Q>
concept DeviceRing = requires(Q q, const Q cq, std::span<iovec> segs) {
  { q.pending() } -> std::same_as<std::uint16_t>;
  { q.pop(segs) } -> std::same_as<std::expected<Chain, ChainError>>;
  q.push_used(std::uint16_t{}, std::uint32_t{});
  q.publish_used();
  { cq.peek_pending(std::uint16_t{}) } -> std::same_as<std::span<std::uint8_t>>;
  cq.log_write(std::span<const iovec>{}, std::size_t{});
  { q.needs_notify() } -> std::same_as<bool>;
  q.disable_notifications();
  { q.enable_notifications() } -> std::same_as<bool>;
  { cq.broken() } -> std::same_as<bool>;
  { cq.size() } -> std::same_as<std::uint16_t>;
  { cq.errors() } -> std::same_as<const std::array<std::uint64_t, kChainErrorCount>&>;
  { cq.error_total() } -> std::same_as<std::uint64_t>;
};

namespace detail {
// The longest chain a device accepts in total bytes: a used length is 32 bits.
inline constexpr std::uint64_t kMaxChainBytes = std::numeric_limits<std::uint32_t>::max();

constexpr ChainError from_xlate(memory::XlateError e) noexcept {
  switch (e) {
    case memory::XlateError::wraps: return ChainError::desc_len_wraps;
    case memory::XlateError::too_many_iov: return ChainError::too_many_segments;
    case memory::XlateError::not_mapped: break;
  }
  return ChainError::desc_not_mapped;
}

// The most regions an indirect table may span when it does not lie in one.
inline constexpr std::size_t kIndirectTablePieces = 8;

// An indirect table that is contiguous in guest-physical memory but spans regions (adjacent in
// the guest, apart in our address space: separate memory backends, a DPDK front-end's hugepage
// segments), copied whole into `buf`, where the walk then reads it. Each byte of the table is
// read once, as the in-place walk reads each entry once. Errors: indirect_not_mapped when a
// byte of it is outside guest memory or it spans more than kIndirectTablePieces regions,
// chain_too_long when it is longer than `buf` (sized to hold a queue-size table).
std::expected<const std::uint8_t*, ChainError> copy_spanning_table(
    const memory::GuestMemory& mem, std::uint64_t gpa, std::uint32_t len,
    std::span<std::uint8_t> buf) noexcept;

// Where the walk reads an indirect table from: in place when it lies in one region (the common
// case, one inline lookup), else its copy in `copy` (copy_spanning_table).
inline std::expected<const std::uint8_t*, ChainError> indirect_table(
    const memory::GuestMemory& mem, std::uint64_t gpa, std::uint32_t len,
    std::span<std::uint8_t> copy) noexcept {
  if (const std::uint8_t* p = mem.gpa_to_host(gpa, len)) [[likely]]
    return p;
  return copy_spanning_table(mem, gpa, len, copy);
}
}  // namespace detail

}  // namespace vhostkit::virtq
