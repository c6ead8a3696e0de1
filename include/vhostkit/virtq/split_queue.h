// The split virtqueue (virtio 1.2, 2.7) from both sides:
//   DeviceQueue: the backend's view: pops validated chains, pushes used elements in batches,
//                decides when to signal the driver (event idx / NO_INTERRUPT).
//   DriverQueue: our userspace driver: adds buffers, publishes avail, decides when to kick,
//                reclaims used chains.
// The ring lives in memory shared with the peer, who may change any byte at any moment: the
// device side reads every descriptor once, validates it, and never trusts a value twice.
#pragma once

#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <expected>
#include <optional>
#include <span>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/ring.h"
#include "vhostkit/virtq/chain.h"

namespace vhostkit::virtq {

// The event-idx words that trail the two rings (2.7.10): used_event after avail->ring[size],
// avail_event after used->ring[size].
inline std::uint16_t* used_event_word(virtio::VirtqAvail* avail, std::uint16_t size) noexcept {
  return reinterpret_cast<std::uint16_t*>(reinterpret_cast<std::byte*>(avail) + 4 +
                                          2 * std::size_t{size});
}
inline std::uint16_t* avail_event_word(virtio::VirtqUsed* used, std::uint16_t size) noexcept {
  return reinterpret_cast<std::uint16_t*>(reinterpret_cast<std::byte*>(used) + 4 +
                                          8 * std::size_t{size});
}

// Host addresses of the three parts of a ring, already translated and checked to lie in guest
// memory by the caller (vhost::Device), with the queue size.
struct SplitRing {
  virtio::VirtqDesc* desc = nullptr;
  virtio::VirtqAvail* avail = nullptr;
  virtio::VirtqUsed* used = nullptr;
  std::uint16_t size = 0;
};

class DeviceQueue {
 public:
  DeviceQueue() = default;

  // Starts serving `ring`. `mem` translates descriptor addresses and must outlive the attachment.
  // features: the negotiated feature bits (EVENT_IDX, INDIRECT_DESC matter here).
  // last_avail_idx: where to resume (SET_VRING_BASE). The used index is read from the ring.
  // A null part, an invalid size or avail/used not 2/4-byte aligned leave the queue broken.
  void attach(const memory::GuestMemory* mem, SplitRing ring, std::uint64_t features,
              std::uint16_t last_avail_idx) noexcept;
  void detach() noexcept;
  bool attached() const noexcept { return ring_.desc != nullptr; }
  bool broken() const noexcept { return broken_; }
  std::uint16_t size() const noexcept { return ring_.size; }

  // Chains the driver has made available that we have not popped. Reads avail->idx with
  // acquire only when every chain seen at the last read has been popped (so it may report
  // fewer than are there). A jump of more than size() marks the queue broken and returns 0.
  std::uint16_t pending() noexcept;

  // Pops the next available chain into `segs`. On a bad chain (not breaking the queue), the
  // chain is consumed and answered with used len 0, counted, and the error is returned; the
  // caller just moves on (the used element is queued: the next publish_used() shows it). On an
  // error that breaks the queue nothing more is served. Call when pending() > 0; otherwise it
  // returns ChainError::empty (or queue_broken). Single-descriptor chains take an inline path.
  // An indirect table spanning regions is copied and walked from the copy (it may then be no
  // longer than the queue); a chain may hold at most size() buffer descriptors in total (ring
  // table and indirect table together).
  std::expected<Chain, ChainError> pop(std::span<iovec> segs) noexcept;
  // For prefetching ahead of a burst, nothing else: the first buffer of the i-th chain that
  // pending() counted (0: the next pop()), translated, or empty for an index not counted, an
  // indirect descriptor or a buffer outside guest memory. The ring is read without being
  // trusted or changed: the chain pop() hands out later is checked again and may differ.
  std::span<std::uint8_t> peek_pending(std::uint16_t i) const noexcept;
  // A hint ahead of a burst: asks for the used ring lines the next `n` push_used() calls write,
  // for writing (the driver's core reads them, so they are rarely ours).
  void prefetch_used(std::uint16_t n) const noexcept;
  // Takes the chain at `head` again without touching the avail ring or last_avail_idx: a
  // restarted back-end resubmitting the requests its predecessor left in flight (vhost-user's
  // inflight I/O tracking). The chain is walked and checked exactly as pop() does, and a bad one
  // is answered the same way (used len 0, counted). `head` comes from the device's own record,
  // which the peer may have written: a head >= size() is refused (head_out_of_range, counted)
  // and breaks nothing, since no ring entry named it. Split ring only; the packed ring's
  // inflight layout (descriptor states by buffer id) is not handled yet.
  std::expected<Chain, ChainError> take(std::uint16_t head, std::span<iovec> segs) noexcept;
  // The head of the last chain pop() or take() answered itself (a bad chain, used len 0), for a
  // device that records every used entry (inflight tracking).
  std::uint16_t last_bad_head() const noexcept { return last_bad_head_; }

  // Queues a used element (head, bytes written); visible to the driver only after publish_used().
  // With IN_ORDER, a chain pushed right after the one popped before it, when that one was
  // written completely, shares its used element (one element for the run with the last head,
  // used->idx still counting each chain: 2.7.8).
  void push_used(std::uint16_t head, std::uint32_t len) noexcept;
  // Makes every queued used element visible with one release store of used->idx.
  void publish_used() noexcept;
  // Live migration: marks the guest pages behind the first `len` bytes of a chain's writable
  // buffers in the table's dirty log, which is there only while the front-end asked for logging
  // (VHOST_F_LOG_ALL). Device handlers call it once per chain with what they wrote into it (the
  // used length), after the writes and before publishing. A load and a branch when not logging.
  void log_write(std::span<const iovec> writable, std::size_t len) const noexcept {
    if (mem_ != nullptr && mem_->dirty_log() != nullptr) [[unlikely]] {
      mem_->log_host_write(writable, len);
    }
  }

  // After publish_used(): should the driver be signalled (call eventfd)? Implements
  // EVENT_IDX (used_event) or the NO_INTERRUPT flag; remembers what was signalled.
  bool needs_notify() noexcept;

  // Asks the driver not to kick (busy polling).
  void disable_notifications() noexcept;
  // Asks the driver to kick again. Returns true if chains were published since the queue last
  // read avail->idx: the caller must poll once more before sleeping, or it may sleep on a kick
  // that never comes. Chains already seen and left on the ring (an rx ring waiting for frames)
  // do not count, so a handler that leaves them does not spin.
  bool enable_notifications() noexcept;

  std::uint16_t last_avail_idx() const noexcept { return last_avail_idx_; }
  std::uint16_t used_idx() const noexcept { return used_idx_; }
  const std::array<std::uint64_t, kChainErrorCount>& errors() const noexcept { return errors_; }
  // The sum of errors(), kept as they are counted: a device checks it after every burst.
  std::uint64_t error_total() const noexcept { return error_total_; }

 private:
  // Walks the chain whose head descriptor `first` was already copied out of the ring.
  std::expected<Chain, ChainError> walk(std::uint16_t head, const virtio::VirtqDesc& first,
                                        std::span<iovec> segs) noexcept;
  std::expected<Chain, ChainError> pop_slow(std::span<iovec> segs) noexcept;
  void count(ChainError e) noexcept;
  void mark_broken(ChainError e) noexcept;
  // Marks a notification word of the used ring (flags, avail_event) in the dirty log.
  void log_used_word(std::uint16_t* word) const noexcept;
  // IN_ORDER bookkeeping (only with the feature): what pop handed out, in which order.
  void note_popped(std::uint16_t head, std::uint64_t writable_len) noexcept;
  void push_used_in_order(std::uint16_t head, std::uint32_t len) noexcept;

  const memory::GuestMemory* mem_ = nullptr;
  SplitRing ring_{};
  std::uint16_t mask_ = 0;  // size - 1 (sizes are powers of two)
  bool event_idx_ = false;
  bool indirect_ = false;
  bool broken_ = false;
  // On the same cache line as the indices: pop, push_used and publish_used test them.
  bool in_order_ = false;
  bool merge_open_ = false;
  std::uint16_t last_avail_idx_ = 0;
  std::uint16_t avail_idx_cache_ = 0;  // last avail->idx read
  std::uint16_t used_idx_ = 0;         // next used slot to fill (not yet published)
  std::uint16_t published_used_idx_ = 0;
  std::uint16_t signalled_used_idx_ = 0;  // used->idx when we last decided about a signal
  std::uint16_t last_bad_head_ = 0;
  std::array<std::uint64_t, kChainErrorCount> errors_{};
  std::uint64_t error_total_ = 0;
  struct Popped {
    std::uint32_t writable = 0;  // the chain's writable bytes (kNeverComplete: a refused chain)
    std::uint32_t seq = 0;       // pop order
  };
  static constexpr std::uint32_t kNeverComplete = 0xffffffff;
  std::vector<Popped> popped_;  // per head, IN_ORDER only
  // A queue-size indirect table, for one that spans regions (detail::copy_spanning_table).
  std::vector<std::uint8_t> indirect_copy_;
  std::uint32_t pop_seq_ = 0;
  // The used element the last push wrote, while unpublished: IN_ORDER may fold the next into it.
  bool merge_complete_ = false;
  std::uint16_t merge_slot_ = 0;
  std::uint32_t merge_seq_ = 0;
};

// Where the three parts of a ring of `size` live in one block of driver memory (each part
// aligned as the spec requires; the whole block page-aligned by the caller).
struct DriverRingLayout {
  std::size_t desc_offset = 0;
  std::size_t avail_offset = 0;
  std::size_t used_offset = 0;
  std::size_t total_bytes = 0;
  static DriverRingLayout for_size(std::uint16_t size) noexcept;
};

class DriverQueue {
 public:
  struct Buffer {
    std::uint64_t gpa = 0;
    std::uint32_t len = 0;
  };
  struct Used {
    std::uint64_t token = 0;  // what add() was given
    std::uint32_t len = 0;    // bytes the device wrote
    std::uint16_t head = 0;
  };

  DriverQueue() = default;

  // `ring` is host memory of DriverRingLayout::for_size(size).total_bytes at guest-physical
  // address ring_gpa (page-aligned, zeroed here). With VIRTIO_F_RING_INDIRECT_DESC in features,
  // `indirect` (host memory at indirect_gpa) holds one table of max_indirect descriptors per
  // ring slot and chains longer than one buffer use it.
  Result<> init(std::span<std::byte> ring, std::uint64_t ring_gpa, std::uint16_t size,
                std::uint64_t features, std::span<std::byte> indirect = {},
                std::uint64_t indirect_gpa = 0, std::uint16_t max_indirect = 0);

  std::uint16_t size() const noexcept { return size_; }
  std::uint16_t free_count() const noexcept { return free_count_; }
  // Used elements the device returned that we ignored: an id >= size, an id that is not a
  // chain in flight, or a len over the chain's writable bytes (clamped, counted).
  std::uint64_t bad_used() const noexcept { return bad_used_; }

  // Adds one chain (device-readable `out` buffers, then device-writable `in` buffers) to the
  // avail ring, not yet visible. Returns the head, or Errc::would_block when out of descriptors.
  std::expected<std::uint16_t, Errc> add(std::span<const Buffer> out, std::span<const Buffer> in,
                                         std::uint64_t token) noexcept;
  // Makes every added chain visible with one release store of avail->idx.
  void publish() noexcept;
  // After publish(): must the device be kicked? (EVENT_IDX avail_event, or NO_NOTIFY.)
  bool needs_kick() noexcept;

  // Reclaims one used chain (its descriptors return to the free list).
  std::optional<Used> get_used() noexcept;
  // Reclaims up to out.size() used chains; returns how many. With IN_ORDER a used element with
  // head X returns every chain up to X in the order they were added (the ones before X written
  // completely); descriptors are then handed out in ring order, as 2.7.5 requires.
  std::size_t get_used_burst(std::span<Used> out) noexcept;

  // Interrupt (call) suppression on the used side, with the same race rule as the device's.
  void disable_interrupts() noexcept;
  bool enable_interrupts() noexcept;  // true if used entries arrived meanwhile

  std::uint64_t desc_gpa() const noexcept { return ring_gpa_ + layout_.desc_offset; }
  std::uint64_t avail_gpa() const noexcept { return ring_gpa_ + layout_.avail_offset; }
  std::uint64_t used_gpa() const noexcept { return ring_gpa_ + layout_.used_offset; }
  virtio::VirtqDesc* desc() const noexcept { return desc_; }
  virtio::VirtqAvail* avail() const noexcept { return avail_; }
  virtio::VirtqUsed* used() const noexcept { return used_; }

 private:
  DriverRingLayout layout_{};
  std::uint64_t ring_gpa_ = 0;
  virtio::VirtqDesc* desc_ = nullptr;
  virtio::VirtqAvail* avail_ = nullptr;
  virtio::VirtqUsed* used_ = nullptr;
  bool reclaim(std::uint16_t slot, Used& out) noexcept;
  std::size_t get_used_in_order(std::span<Used> out) noexcept;
  // A used element waits at last_used_idx_: reads used->idx again once the cached one is
  // consumed; a device claiming more used than the ring holds is counted and gets nothing.
  bool used_ready() noexcept;

  std::uint16_t size_ = 0;
  std::uint16_t mask_ = 0;
  bool event_idx_ = false;
  bool use_indirect_ = false;
  bool in_order_ = false;
  bool interrupts_enabled_ = true;
  std::uint16_t free_count_ = 0;
  std::uint16_t avail_idx_ = 0;         // next avail slot (not yet published)
  std::uint16_t kicked_avail_idx_ = 0;  // avail->idx when we last decided about a kick
  std::uint16_t last_used_idx_ = 0;
  std::uint16_t used_idx_cache_ = 0;  // last used->idx read
  std::uint64_t bad_used_ = 0;
  // Private copies: the device can rewrite the descriptor table, so freeing a chain never
  // follows the shared next fields.
  // Per descriptor index, in one 16-byte record so add and reclaim touch one cache line.
  struct Slot {
    std::uint64_t token = 0;      // (heads) what add() was given
    std::uint32_t in_len = 0;     // (heads) device-writable bytes
    std::uint16_t chain_len = 0;  // (heads) descriptors in flight; 0: not a head in flight
    std::uint16_t next = 0;       // our own next link
  };
  std::vector<std::uint16_t> free_;  // free descriptor indices (a stack)
  std::vector<Slot> slots_;
  std::span<std::byte> indirect_{};
  std::uint64_t indirect_gpa_ = 0;
  std::uint16_t max_indirect_ = 0;
  // IN_ORDER: descriptors go out in ring order from next_desc_ and come back from oldest_head_;
  // a used element standing for several chains is drained over calls.
  std::uint16_t next_desc_ = 0;
  std::uint16_t oldest_head_ = 0;
  std::uint16_t drain_left_ = 0;
  std::uint32_t drain_len_ = 0;
};

}  // namespace vhostkit::virtq

// ---- The hot path, inline: the per-chain cost is a handful of loads and stores, and a call
// into another translation unit would be a noticeable part of it.
namespace vhostkit::virtq {

namespace detail {
// Copies one descriptor out of shared memory. The guest may rewrite it while we look, so every
// check runs on this copy and the shared bytes are never read a second time.
// Takes an untyped pointer: an indirect table may sit at any guest address, and a misaligned
// VirtqDesc* would itself be undefined behaviour.
inline virtio::VirtqDesc read_desc_once(const void* shared) noexcept {
  virtio::VirtqDesc d;
  std::memcpy(&d, shared, sizeof d);
  // Compiler-only fence: orders the copy before every use of `d`, so the compiler cannot fold
  // a later use back into a second read of the shared descriptor.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  return d;
}
}  // namespace detail

inline std::uint16_t DeviceQueue::pending() noexcept {
  if (broken_ || ring_.avail == nullptr) [[unlikely]]
    return 0;
  // Chains seen at the last read and not yet popped: no need to touch the shared line.
  std::uint16_t n = static_cast<std::uint16_t>(avail_idx_cache_ - last_avail_idx_);
  if (n != 0) return n;
  // Acquire: the avail ring entries and descriptors written before idx are visible after it.
  const std::uint16_t idx =
      std::atomic_ref<std::uint16_t>(ring_.avail->idx).load(std::memory_order_acquire);
  n = static_cast<std::uint16_t>(idx - last_avail_idx_);
  if (n > ring_.size) [[unlikely]] {
    mark_broken(ChainError::avail_idx_runaway);
    return 0;
  }
  avail_idx_cache_ = idx;
  return n;
}

inline std::expected<Chain, ChainError> DeviceQueue::pop(std::span<iovec> segs) noexcept {
  if (last_avail_idx_ == avail_idx_cache_ || broken_) [[unlikely]]
    return pop_slow(segs);
  // One read of the slot; the driver may rewrite it at any time after we advance.
  const std::uint16_t head =
      std::atomic_ref<std::uint16_t>(ring_.avail->ring[last_avail_idx_ & mask_])
          .load(std::memory_order_relaxed);
  ++last_avail_idx_;
  if (head >= ring_.size) [[unlikely]] {
    mark_broken(ChainError::head_out_of_range);
    return std::unexpected(ChainError::head_out_of_range);
  }
  const virtio::VirtqDesc d = detail::read_desc_once(ring_.desc + head);
  // Fast path: one non-empty descriptor inside one region (most network packets).
  if ((d.flags & (virtio::kDescFNext | virtio::kDescFIndirect)) == 0 && d.len != 0 && !segs.empty())
      [[likely]] {
    if (std::uint8_t* p = mem_->gpa_to_host(d.addr, d.len)) [[likely]] {
      segs[0] = iovec{p, d.len};
      Chain c;
      c.head = head;
      c.desc_count = 1;
      if (d.flags & virtio::kDescFWrite) {
        c.writable = segs.first(1);
        c.writable_len = d.len;
      } else {
        c.readable = segs.first(1);
        c.readable_len = d.len;
      }
      if (in_order_) [[unlikely]]
        note_popped(head, c.writable_len);
      return c;
    }
  }
  auto chain = walk(head, d, segs);
  if (in_order_) [[unlikely]]
    note_popped(head, chain ? chain->writable_len : kNeverComplete);
  if (!chain) [[unlikely]] {
    push_used(head, 0);
    last_bad_head_ = head;
    count(chain.error());
  }
  return chain;
}

inline std::span<std::uint8_t> DeviceQueue::peek_pending(std::uint16_t i) const noexcept {
  if (broken_ || static_cast<std::uint16_t>(avail_idx_cache_ - last_avail_idx_) <= i) return {};
  const std::uint16_t head =
      std::atomic_ref<std::uint16_t>(ring_.avail->ring[(last_avail_idx_ + i) & mask_])
          .load(std::memory_order_relaxed);
  if (head >= ring_.size) [[unlikely]]
    return {};
  const virtio::VirtqDesc d = detail::read_desc_once(ring_.desc + head);
  if ((d.flags & virtio::kDescFIndirect) != 0 || d.len == 0) return {};
  std::uint8_t* p = mem_->gpa_to_host(d.addr, d.len);
  return p != nullptr ? std::span<std::uint8_t>(p, d.len) : std::span<std::uint8_t>{};
}

inline void DeviceQueue::prefetch_used(std::uint16_t n) const noexcept {
  if (ring_.used == nullptr || n == 0) return;
  n = std::min(n, ring_.size);
  const std::uint16_t at = used_idx_ & mask_;
  const std::uint16_t first = std::min<std::uint16_t>(n, ring_.size - at);
  prefetch_for_write(&ring_.used->ring[at], first * sizeof(virtio::VirtqUsedElem));
  if (first < n)
    prefetch_for_write(&ring_.used->ring[0], (n - first) * sizeof(virtio::VirtqUsedElem));
}

inline void DeviceQueue::push_used(std::uint16_t head, std::uint32_t len) noexcept {
  if (in_order_) [[unlikely]] {
    push_used_in_order(head, len);
    return;
  }
  virtio::VirtqUsedElem& e = ring_.used->ring[used_idx_ & mask_];
  e.id = head;
  e.len = len;
  ++used_idx_;
}

inline void DeviceQueue::publish_used() noexcept {
  // Release: the used elements written above are visible before the new idx.
  std::atomic_ref<std::uint16_t>(ring_.used->idx).store(used_idx_, std::memory_order_release);
  published_used_idx_ = used_idx_;
  merge_open_ = false;  // the driver may read that element now: it is no longer ours to change
}

inline void DriverQueue::publish() noexcept {
  // Release: descriptors and avail ring slots written by add() are visible before the new idx.
  std::atomic_ref<std::uint16_t>(avail_->idx).store(avail_idx_, std::memory_order_release);
}

}  // namespace vhostkit::virtq
