// The packed virtqueue (virtio 1.2, 2.8) from both sides, with the split ring's API:
//   PackedDeviceQueue: the backend's view: pops validated chains, writes used descriptors in
//                      batches, decides when to signal the driver (event suppression).
//   PackedDriverQueue: our userspace driver: adds buffers, decides when to kick, reclaims.
// One descriptor ring is written by both sides: the driver makes descriptors available by
// flipping their AVAIL/USED bits to its wrap counter, the device overwrites consumed ones with
// used descriptors. Every descriptor the device follows is copied once, then checked; a chain is
// named by the buffer id in its last descriptor, which the device checks against the ids it
// holds in flight.
#pragma once

#include <sys/uio.h>

#include <algorithm>
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
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::virtq {

// Host addresses of the three parts of a packed ring (vhost-user's SET_VRING_ADDR carries the
// driver area as "avail" and the device area as "used"), checked by the caller to lie in guest
// memory.
struct PackedRing {
  virtio::PackedDesc* desc = nullptr;
  virtio::PackedEventSuppress* driver_event = nullptr;  // the driver's: read by the device
  virtio::PackedEventSuppress* device_event = nullptr;  // the device's: read by the driver
  std::uint16_t size = 0;
};

// Where a packed ring resumes: the next descriptor the device reads and the next it writes as
// used, each with its wrap counter (both start at 1). GET/SET_VRING_BASE carry it in one 32-bit
// num (vhost-user.rst, "Vring descriptor indices for packed virtqueues"): bits 0-14 the avail
// index, bit 15 the avail wrap counter, bits 16-30 the used index, bit 31 the used wrap counter.
// Front-ends that send bits 0-15 only (DPDK's vhost library reads no more) stop the ring with
// every chain answered, where used equals avail: use_avail_for_used() gives that reading.
struct PackedRingBase {
  std::uint16_t avail_idx = 0;
  bool avail_wrap = true;
  std::uint16_t used_idx = 0;
  bool used_wrap = true;

  constexpr std::uint32_t encode() const noexcept {
    return std::uint32_t{avail_idx & 0x7fffu} | (avail_wrap ? 1u << 15 : 0u) |
           (std::uint32_t{used_idx & 0x7fffu} << 16) | (used_wrap ? 1u << 31 : 0u);
  }
  static constexpr PackedRingBase decode(std::uint32_t num) noexcept {
    return PackedRingBase{static_cast<std::uint16_t>(num & 0x7fff), (num & (1u << 15)) != 0,
                          static_cast<std::uint16_t>((num >> 16) & 0x7fff),
                          (num & (1u << 31)) != 0};
  }
  constexpr PackedRingBase use_avail_for_used() const noexcept {
    return PackedRingBase{avail_idx, avail_wrap, avail_idx, avail_wrap};
  }
  friend constexpr bool operator==(const PackedRingBase&, const PackedRingBase&) = default;
};

namespace detail {
// Copies one packed descriptor out of shared memory; every check runs on the copy.
inline virtio::PackedDesc read_packed_desc_once(const void* shared) noexcept {
  virtio::PackedDesc d;
  std::memcpy(&d, shared, sizeof d);
  // Compiler-only fence: orders the copy before every use of `d`, so the compiler cannot fold
  // a later use back into a second read of the shared descriptor.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  return d;
}
constexpr bool desc_is_avail(std::uint16_t flags, bool wrap) noexcept {
  return ((flags & virtio::kDescFAvail) != 0) == wrap &&
         ((flags & virtio::kDescFUsed) != 0) != wrap;
}
constexpr bool desc_is_used(std::uint16_t flags, bool wrap) noexcept {
  return ((flags & virtio::kDescFAvail) != 0) == wrap &&
         ((flags & virtio::kDescFUsed) != 0) == wrap;
}
constexpr std::uint16_t avail_bits(bool wrap) noexcept {
  return wrap ? virtio::kDescFAvail : virtio::kDescFUsed;
}
constexpr std::uint16_t used_bits(bool wrap) noexcept {
  return wrap ? static_cast<std::uint16_t>(virtio::kDescFAvail | virtio::kDescFUsed) : 0;
}

// A position on the ring with its wrap counter. As one number ("ext"), in [0, 2 * size): the
// lap with the counter at 1 is [0, size), the next [size, 2 * size); event arithmetic runs on it.
struct RingCursor {
  std::uint16_t pos = 0;
  bool wrap = true;
  // n <= size: at most one wrap.
  void advance(std::uint32_t n, std::uint16_t size) noexcept {
    std::uint32_t p = pos + n;
    if (p >= size) {
      p -= size;
      wrap = !wrap;
    }
    pos = static_cast<std::uint16_t>(p);
  }
  std::uint32_t ext(std::uint16_t size) const noexcept {
    return wrap ? pos : pos + std::uint32_t{size};
  }
  std::uint16_t off_wrap() const noexcept {
    return static_cast<std::uint16_t>(pos | (wrap ? virtio::kEventWrapBit : 0));
  }
};

// The event rule of 2.8.10 on ext positions: signal iff the descriptor named by `event` lies in
// [old_ext, new_ext), modulo 2 * size (vring_need_event's arithmetic, on the packed ring's lap).
bool packed_need_event(std::uint16_t off_wrap, std::uint32_t new_ext, std::uint32_t old_ext,
                       std::uint16_t size) noexcept;

inline virtio::PackedEventSuppress load_event(virtio::PackedEventSuppress* e) noexcept {
  // One 32-bit load: offset and flags written together by the peer are read together.
  return std::atomic_ref<virtio::PackedEventSuppress>(*e).load(std::memory_order_relaxed);
}
inline void store_event(virtio::PackedEventSuppress* e, std::uint16_t off_wrap,
                        std::uint16_t flags) noexcept {
  std::atomic_ref<virtio::PackedEventSuppress>(*e).store(
      virtio::PackedEventSuppress{off_wrap, flags}, std::memory_order_relaxed);
}
static_assert(std::atomic_ref<virtio::PackedEventSuppress>::is_always_lock_free);
}  // namespace detail

class PackedDeviceQueue {
 public:
  PackedDeviceQueue() = default;

  // Starts serving `ring` from `base` (SET_VRING_BASE; a new ring starts at the default).
  // features: EVENT_IDX, INDIRECT_DESC and IN_ORDER matter here. A null part, a misaligned
  // part or a size out of 1..32768 leave the queue broken; so does a base naming a position
  // past the ring or a used position ahead of the avail one (ChainError::wrap_state_invalid).
  void attach(const memory::GuestMemory* mem, PackedRing ring, std::uint64_t features,
              PackedRingBase base = {}) noexcept;
  void detach() noexcept;
  bool attached() const noexcept { return ring_.desc != nullptr; }
  bool broken() const noexcept { return broken_; }
  std::uint16_t size() const noexcept { return ring_.size; }

  // Nonzero when a chain is available. The packed ring has no index to count chains by: the
  // value is the number of available descriptors seen from the next one on (at least the number
  // of chains). Reads shared memory only when every descriptor seen before has been popped.
  std::uint16_t pending() noexcept;

  // Pops the next available chain into `segs`, as DeviceQueue::pop does: a bad chain is
  // answered with used len 0 and counted; a chain whose buffer id is out of range or already in
  // flight is consumed without an answer (drops_chain()); a chain that runs into a descriptor
  // not made available, or over more than size() descriptors, breaks the queue. An indirect
  // table holds at most size() descriptors (one spanning regions is walked from a copy); entries
  // inside it may carry no flag but WRITE (an INDIRECT one is refused as indirect_nested).
  std::expected<Chain, ChainError> pop(std::span<iovec> segs) noexcept;
  // As DeviceQueue's, for the i-th descriptor past the next one that pending() saw available:
  // the head of the i-th chain when every chain before it is one descriptor long.
  std::span<std::uint8_t> peek_pending(std::uint16_t i) const noexcept;

  // As DeviceQueue's: the descriptor ring lines the next `n` used descriptors go to, for writing.
  void prefetch_used(std::uint16_t n) const noexcept;

  // Queues a used descriptor for buffer `id` with `len` bytes written, visible after
  // publish_used(). An id not in flight is ignored. With IN_ORDER, a chain pushed right after
  // the one popped before it, when that one was written completely, joins its used descriptor
  // (one descriptor for the run, with the last id: 2.8.21).
  void push_used(std::uint16_t id, std::uint32_t len) noexcept;
  // Makes the queued used descriptors visible: the first one's flags written last, with release.
  void publish_used() noexcept;

  // Live migration, as DeviceQueue::log_write: marks what was written into a chain's writable
  // buffers in the table's dirty log, when there is one. A load and a branch when not logging.
  void log_write(std::span<const iovec> writable, std::size_t len) const noexcept {
    if (mem_ != nullptr && mem_->dirty_log() != nullptr) [[unlikely]] {
      mem_->log_host_write(writable, len);
    }
  }

  // After publish_used(): should the driver be signalled? Driver event suppression: enable,
  // disable, or (with EVENT_IDX) the descriptor it names.
  bool needs_notify() noexcept;
  void disable_notifications() noexcept;
  // As DeviceQueue's: true only for chains made available since pending() last looked.
  bool enable_notifications() noexcept;

  // The resume point for GET_VRING_BASE (call after publish_used()).
  PackedRingBase base() const noexcept {
    return PackedRingBase{avail_.pos, avail_.wrap, used_.pos, used_.wrap};
  }
  const std::array<std::uint64_t, kChainErrorCount>& errors() const noexcept { return errors_; }
  // The sum of errors(), kept as they are counted: a device checks it after every burst.
  std::uint64_t error_total() const noexcept { return error_total_; }

 private:
  struct InFlight {
    std::uint32_t writable = 0;  // the chain's writable bytes (kNeverComplete: a refused chain)
    std::uint32_t seq = 0;       // pop order
    std::uint16_t count = 0;     // ring descriptors it took; 0: not in flight
  };
  // The used descriptor being built; IN_ORDER folds a run of chains into it.
  struct OpenUsed {
    std::uint16_t slot = 0;
    std::uint16_t id = 0;
    std::uint32_t len = 0;
    std::uint32_t seq = 0;
    bool wrap = false;
    bool complete = false;  // the last chain in it was written completely
    bool valid = false;
  };
  static constexpr std::uint32_t kNeverComplete = 0xffffffff;

  std::expected<Chain, ChainError> walk(virtio::PackedDesc first, std::span<iovec> segs) noexcept;
  std::uint16_t scan_avail() noexcept;
  void advance_avail(std::uint32_t n) noexcept {
    avail_.advance(n, ring_.size);
    ahead_ = ahead_ > n ? ahead_ - n : 0;
  }
  void close_open() noexcept;
  void count(ChainError e) noexcept;
  void mark_broken(ChainError e) noexcept;

  const memory::GuestMemory* mem_ = nullptr;
  PackedRing ring_{};
  bool event_idx_ = false;
  bool indirect_ = false;
  bool in_order_ = false;
  bool broken_ = false;
  detail::RingCursor avail_{};  // next descriptor to read
  std::uint32_t ahead_ = 0;     // descriptors from avail_ on that pending() saw available
  detail::RingCursor used_{};   // next used slot to fill
  std::uint32_t pop_seq_ = 0;
  OpenUsed open_{};
  bool first_pending_ = false;  // the unpublished batch's first used descriptor, flags held back
  std::uint16_t first_slot_ = 0;
  std::uint16_t first_flags_ = 0;
  std::uint32_t published_ext_ = 0;
  std::uint32_t signalled_ext_ = 0;  // used position when we last decided about a signal
  std::vector<InFlight> inflight_;   // per buffer id
  // A queue-size indirect table, for one that spans regions (detail::copy_spanning_table).
  std::vector<std::uint8_t> indirect_copy_;
  std::array<std::uint64_t, kChainErrorCount> errors_{};
  std::uint64_t error_total_ = 0;
};

// Where the three parts of a packed ring of `size` live in one block of driver memory; the
// event structures sit on their own cache lines, away from the descriptors.
struct PackedRingLayout {
  std::size_t desc_offset = 0;
  std::size_t driver_event_offset = 0;
  std::size_t device_event_offset = 0;
  std::size_t total_bytes = 0;
  static PackedRingLayout for_size(std::uint16_t size) noexcept;
};

class PackedDriverQueue {
 public:
  using Buffer = DriverQueue::Buffer;
  using Used = DriverQueue::Used;  // head: the buffer id

  PackedDriverQueue() = default;

  // As DriverQueue::init, with PackedRingLayout: `ring` (zeroed here) at ring_gpa, 16-byte
  // aligned; any size 1..32768; one indirect table of max_indirect descriptors per buffer id.
  Result<> init(std::span<std::byte> ring, std::uint64_t ring_gpa, std::uint16_t size,
                std::uint64_t features, std::span<std::byte> indirect = {},
                std::uint64_t indirect_gpa = 0, std::uint16_t max_indirect = 0);

  std::uint16_t size() const noexcept { return size_; }
  std::uint16_t free_count() const noexcept { return free_desc_; }  // free descriptors
  // Used descriptors we refused: a len over the chain's writable bytes (clamped, counted), or an
  // id out of range or not in flight, after which the device is taken as broken and nothing
  // more is reclaimed (without the id we cannot tell where its next used descriptor is).
  std::uint64_t bad_used() const noexcept { return bad_used_; }
  bool broken() const noexcept { return broken_; }

  // Adds one chain (readable `out`, then writable `in`), not visible before publish().
  // Returns the buffer id, or Errc::would_block when out of descriptors or ids.
  std::expected<std::uint16_t, Errc> add(std::span<const Buffer> out, std::span<const Buffer> in,
                                         std::uint64_t token) noexcept;
  // Makes every added chain visible: the batch's first descriptor flags stored last, release.
  void publish() noexcept;
  // After publish(): must the device be kicked? (Device event suppression.)
  bool needs_kick() noexcept;

  std::optional<Used> get_used() noexcept;
  // Reclaims up to out.size() used chains. With IN_ORDER a used descriptor with id X returns
  // every chain up to X in the order they were added (the ones before X written completely).
  std::size_t get_used_burst(std::span<Used> out) noexcept;

  void disable_interrupts() noexcept;
  bool enable_interrupts() noexcept;  // true if used descriptors arrived meanwhile

  std::uint64_t desc_gpa() const noexcept { return ring_gpa_ + layout_.desc_offset; }
  std::uint64_t driver_event_gpa() const noexcept {
    return ring_gpa_ + layout_.driver_event_offset;
  }
  std::uint64_t device_event_gpa() const noexcept {
    return ring_gpa_ + layout_.device_event_offset;
  }
  virtio::PackedDesc* desc() const noexcept { return desc_; }
  virtio::PackedEventSuppress* driver_event() const noexcept { return driver_event_; }
  virtio::PackedEventSuppress* device_event() const noexcept { return device_event_; }

 private:
  struct IdState {
    std::uint64_t token = 0;
    std::uint32_t in_len = 0;  // device-writable bytes
    std::uint16_t count = 0;   // ring descriptors the chain took; 0: not in flight
  };
  void write_desc(std::uint64_t addr, std::uint32_t len, std::uint16_t id,
                  std::uint16_t flags) noexcept;
  void release(std::uint16_t id, std::uint32_t len, Used& out) noexcept;

  PackedRingLayout layout_{};
  std::uint64_t ring_gpa_ = 0;
  virtio::PackedDesc* desc_ = nullptr;
  virtio::PackedEventSuppress* driver_event_ = nullptr;
  virtio::PackedEventSuppress* device_event_ = nullptr;
  std::uint16_t size_ = 0;
  bool event_idx_ = false;
  bool use_indirect_ = false;
  bool in_order_ = false;
  bool interrupts_enabled_ = true;
  bool broken_ = false;
  detail::RingCursor avail_{};  // next descriptor to fill
  detail::RingCursor used_{};   // next used descriptor to read
  std::uint32_t kicked_ext_ = 0;
  bool batch_open_ = false;  // a batch added but not published: its first flags held back
  std::uint16_t batch_first_ = 0;
  std::uint16_t batch_flags_ = 0;
  std::uint16_t free_desc_ = 0;
  std::uint16_t free_id_count_ = 0;
  std::uint64_t bad_used_ = 0;
  std::vector<std::uint16_t> free_ids_;  // a stack
  std::vector<IdState> ids_;
  // IN_ORDER: ids in the order they were added, and the used descriptor being drained.
  std::vector<std::uint16_t> fifo_;
  std::uint16_t fifo_head_ = 0;
  bool draining_ = false;
  std::uint16_t drain_id_ = 0;
  std::uint32_t drain_len_ = 0;
  std::span<std::byte> indirect_{};
  std::uint64_t indirect_gpa_ = 0;
  std::uint16_t max_indirect_ = 0;
};

static_assert(DeviceRing<DeviceQueue>);
static_assert(DeviceRing<PackedDeviceQueue>);

}  // namespace vhostkit::virtq

// ---- The hot path, inline (as the split ring's).
namespace vhostkit::virtq {

inline std::uint16_t PackedDeviceQueue::pending() noexcept {
  if (ahead_ != 0) return static_cast<std::uint16_t>(ahead_);
  if (broken_ || ring_.desc == nullptr) [[unlikely]]
    return 0;
  const std::uint16_t flags =
      std::atomic_ref<std::uint16_t>(ring_.desc[avail_.pos].flags).load(std::memory_order_relaxed);
  if (!detail::desc_is_avail(flags, avail_.wrap)) return 0;
  return scan_avail();
}

inline std::expected<Chain, ChainError> PackedDeviceQueue::pop(std::span<iovec> segs) noexcept {
  if (broken_ || ring_.desc == nullptr) [[unlikely]]
    return std::unexpected(ChainError::queue_broken);
  virtio::PackedDesc* slot = ring_.desc + avail_.pos;
  // Acquire: the driver wrote the chain's descriptors and buffers before this flags store.
  const std::uint16_t flags =
      std::atomic_ref<std::uint16_t>(slot->flags).load(std::memory_order_acquire);
  if (!detail::desc_is_avail(flags, avail_.wrap)) [[unlikely]] {
    // What pending() counted is gone: a driver marked descriptors in flight available and our
    // used writes covered them. Forget the count, or pending() would stay nonzero forever.
    ahead_ = 0;
    return std::unexpected(ChainError::empty);
  }
  virtio::PackedDesc d = detail::read_packed_desc_once(slot);
  d.flags = flags;  // judged by the flags we acquired: one value, read once
  // Fast path: one non-empty descriptor inside one region, a fresh id (most network packets).
  if ((d.flags & (virtio::kDescFNext | virtio::kDescFIndirect)) == 0 && d.len != 0 &&
      !segs.empty() && d.id < ring_.size) [[likely]] {
    InFlight& f = inflight_[d.id];
    std::uint8_t* p = f.count == 0 ? mem_->gpa_to_host(d.addr, d.len) : nullptr;
    if (p != nullptr) [[likely]] {
      segs[0] = iovec{p, d.len};
      Chain c;
      c.head = d.id;
      c.desc_count = 1;
      const bool write = (d.flags & virtio::kDescFWrite) != 0;
      if (write) {
        c.writable = segs.first(1);
        c.writable_len = d.len;
      } else {
        c.readable = segs.first(1);
        c.readable_len = d.len;
      }
      f = InFlight{write ? d.len : 0, pop_seq_++, 1};
      advance_avail(1);
      return c;
    }
  }
  return walk(d, segs);
}

inline std::span<std::uint8_t> PackedDeviceQueue::peek_pending(std::uint16_t i) const noexcept {
  if (broken_ || i >= ahead_) return {};
  detail::RingCursor c = avail_;
  c.advance(i, ring_.size);
  const virtio::PackedDesc d = detail::read_packed_desc_once(ring_.desc + c.pos);
  if (!detail::desc_is_avail(d.flags, c.wrap) || (d.flags & virtio::kDescFIndirect) != 0 ||
      d.len == 0)
    return {};
  std::uint8_t* p = mem_->gpa_to_host(d.addr, d.len);
  return p != nullptr ? std::span<std::uint8_t>(p, d.len) : std::span<std::uint8_t>{};
}

inline void PackedDeviceQueue::prefetch_used(std::uint16_t n) const noexcept {
  if (ring_.desc == nullptr || n == 0) return;
  n = std::min(n, ring_.size);
  const std::uint16_t first = std::min<std::uint16_t>(n, ring_.size - used_.pos);
  prefetch_for_write(ring_.desc + used_.pos, first * sizeof(virtio::PackedDesc));
  if (first < n) prefetch_for_write(ring_.desc, (n - first) * sizeof(virtio::PackedDesc));
}

inline void PackedDeviceQueue::close_open() noexcept {
  if (!open_.valid) return;
  open_.valid = false;
  virtio::PackedDesc& u = ring_.desc[open_.slot];
  u.id = open_.id;
  u.len = open_.len;
  const auto flags = static_cast<std::uint16_t>(detail::used_bits(open_.wrap) |
                                                (open_.len != 0 ? virtio::kDescFWrite : 0));
  if (!first_pending_) {
    first_pending_ = true;
    first_slot_ = open_.slot;
    first_flags_ = flags;
    return;
  }
  // Relaxed: the driver reads used descriptors in ring order, so it reaches this one only after
  // the batch's first, whose release store in publish_used() comes later.
  std::atomic_ref<std::uint16_t>(u.flags).store(flags, std::memory_order_relaxed);
}

inline void PackedDeviceQueue::push_used(std::uint16_t id, std::uint32_t len) noexcept {
  if (id >= ring_.size) [[unlikely]]
    return;
  InFlight& f = inflight_[id];
  if (f.count == 0) [[unlikely]]
    return;
  const std::uint16_t count = f.count;
  f.count = 0;
  if (in_order_ && open_.valid && open_.complete && f.seq == open_.seq + 1) {
    open_.id = id;
    open_.len = len;
    open_.seq = f.seq;
    open_.complete = len == f.writable;
  } else {
    close_open();
    open_ = OpenUsed{used_.pos, id, len, f.seq, used_.wrap, len == f.writable, true};
  }
  used_.advance(count, ring_.size);
}

inline void PackedDeviceQueue::publish_used() noexcept {
  if (ring_.desc == nullptr) [[unlikely]]
    return;
  close_open();
  if (first_pending_) {
    // Release: the batch's used descriptors (ids, lengths, later flags) and the bytes written
    // into the buffers are visible before the driver sees the first one used.
    std::atomic_ref<std::uint16_t>(ring_.desc[first_slot_].flags)
        .store(first_flags_, std::memory_order_release);
    first_pending_ = false;
  }
  published_ext_ = used_.ext(ring_.size);
}

inline void PackedDriverQueue::publish() noexcept {
  if (!batch_open_) return;
  // Release: every descriptor of the batch (the later ones' flags included) and the buffers
  // are visible before the device sees the first one available.
  std::atomic_ref<std::uint16_t>(desc_[batch_first_].flags)
      .store(batch_flags_, std::memory_order_release);
  batch_open_ = false;
}

}  // namespace vhostkit::virtq
