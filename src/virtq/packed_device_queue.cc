// Device side of the packed virtqueue: the chain walker and the event suppression rules. The
// per-chain fast path (pending, pop's front, push_used, publish_used) is inline in the header.
#include <atomic>
#include <cstring>

#include "vhostkit/virtq/packed_queue.h"

namespace vhostkit::virtq {

namespace {

using virtio::kDescFIndirect;
using virtio::kDescFNext;
using virtio::kDescFWrite;

// (a - b) modulo span, for a and b in [0, span).
constexpr std::uint32_t ring_dist(std::uint32_t a, std::uint32_t b, std::uint32_t span) {
  return a >= b ? a - b : a + span - b;
}

// Collects a chain's buffers into the caller's segments, readable ones first.
struct ChainBuilder {
  const memory::GuestMemory& mem;
  std::span<iovec> segs;
  std::size_t nseg = 0;
  std::size_t nread = 0;
  std::uint64_t rlen = 0;
  std::uint64_t wlen = 0;
  bool writing = false;

  std::optional<ChainError> add(std::uint64_t addr, std::uint32_t len, bool write) noexcept {
    if (len == 0) return std::nullopt;
    if (addr + len < addr) return ChainError::desc_len_wraps;
    if (write) {
      writing = true;
      wlen += len;
    } else {
      if (writing) return ChainError::readable_after_writable;
      rlen += len;
    }
    if (rlen + wlen > detail::kMaxChainBytes) return ChainError::total_too_large;
    auto pieces = mem.gpa_to_iovec(addr, len, segs.subspan(nseg));
    if (!pieces) return detail::from_xlate(pieces.error());
    nseg += *pieces;
    if (!writing) nread = nseg;
    return std::nullopt;
  }
};

}  // namespace

namespace detail {
bool packed_need_event(std::uint16_t off_wrap, std::uint32_t new_ext, std::uint32_t old_ext,
                       std::uint16_t size) noexcept {
  const std::uint32_t span = 2u * size;
  const std::uint32_t off = off_wrap & 0x7fffu;
  // An offset past the ring names no descriptor: signal rather than risk a lost wake-up.
  if (off >= size) return true;
  const std::uint32_t event = (off_wrap & virtio::kEventWrapBit) ? off : off + size;
  const std::uint32_t since_event = ring_dist(new_ext, event, span);
  return (since_event == 0 ? span - 1 : since_event - 1) < ring_dist(new_ext, old_ext, span);
}
}  // namespace detail

void PackedDeviceQueue::attach(const memory::GuestMemory* mem, PackedRing ring,
                               std::uint64_t features, PackedRingBase base) noexcept {
  mem_ = mem;
  ring_ = ring;
  event_idx_ = virtio::has(features, virtio::feature::ring_event_idx);
  indirect_ = virtio::has(features, virtio::feature::ring_indirect_desc);
  in_order_ = virtio::has(features, virtio::feature::in_order);
  broken_ = false;
  errors_ = {};
  error_total_ = 0;
  ahead_ = 0;
  pop_seq_ = 0;
  open_ = {};
  first_pending_ = false;
  avail_ = {};
  used_ = {};
  published_ext_ = 0;
  signalled_ext_ = 0;
  if (mem == nullptr || ring.desc == nullptr || ring.driver_event == nullptr ||
      ring.device_event == nullptr || !virtio::is_valid_packed_queue_size(ring.size)) {
    // Nothing sane to serve; vhost::Device validates before attaching, this is a backstop.
    ring_ = {};
    broken_ = true;
    return;
  }
  // Flags and event structures are accessed through atomic_ref, which needs natural alignment
  // (the spec's part alignment guarantees it).
  if (reinterpret_cast<std::uintptr_t>(ring.desc) % virtio::kPackedDescAlign != 0 ||
      reinterpret_cast<std::uintptr_t>(ring.driver_event) % virtio::kEventSuppressAlign != 0 ||
      reinterpret_cast<std::uintptr_t>(ring.device_event) % virtio::kEventSuppressAlign != 0) {
    ring_ = {};
    broken_ = true;
    return;
  }
  // Once per ring size: a re-attach of the same size allocates nothing.
  inflight_.assign(ring.size, InFlight{});
  if (indirect_) indirect_copy_.resize(std::size_t{ring.size} * sizeof(virtio::PackedDesc));
  // A resume point must name positions on the ring, the used one behind the avail one by at
  // most a ring: the device cannot have answered what it never read.
  avail_ = detail::RingCursor{base.avail_idx, base.avail_wrap};
  used_ = detail::RingCursor{base.used_idx, base.used_wrap};
  if (base.avail_idx >= ring.size || base.used_idx >= ring.size ||
      ring_dist(avail_.ext(ring.size), used_.ext(ring.size), 2u * ring.size) > ring.size) {
    mark_broken(ChainError::wrap_state_invalid);
    return;
  }
  published_ext_ = used_.ext(ring.size);
  signalled_ext_ = published_ext_;
}

void PackedDeviceQueue::detach() noexcept {
  mem_ = nullptr;
  ring_ = {};
  open_ = {};
  first_pending_ = false;
  ahead_ = 0;
  broken_ = false;
}

void PackedDeviceQueue::count(ChainError e) noexcept {
  if (e != ChainError::empty && e != ChainError::kCount) {
    ++errors_[static_cast<std::size_t>(e)];
    ++error_total_;
  }
}

void PackedDeviceQueue::mark_broken(ChainError e) noexcept {
  count(e);
  broken_ = true;
}

std::uint16_t PackedDeviceQueue::scan_avail() noexcept {
  // Counts the run of available descriptors past those already seen. Each is looked at once per
  // lap; pop() reads each head's flags again with acquire before it trusts the chain.
  detail::RingCursor c = avail_;
  c.advance(ahead_, ring_.size);
  while (ahead_ < ring_.size) {
    const std::uint16_t flags =
        std::atomic_ref<std::uint16_t>(ring_.desc[c.pos].flags).load(std::memory_order_relaxed);
    if (!detail::desc_is_avail(flags, c.wrap)) break;
    ++ahead_;
    c.advance(1, ring_.size);
  }
  return static_cast<std::uint16_t>(ahead_);
}

std::expected<Chain, ChainError> PackedDeviceQueue::walk(virtio::PackedDesc d,
                                                         std::span<iovec> segs) noexcept {
  detail::RingCursor c = avail_;
  ChainBuilder b{*mem_, segs};
  // The first content error; the walk goes on to the chain's end, where its buffer id is.
  std::optional<ChainError> bad;
  std::uint32_t ring_count = 0;
  std::uint32_t walked = 0;
  for (;;) {
    ++ring_count;
    ++walked;
    if (ring_count > 1) {
      // More ring descriptors than the ring holds, or one not made available: the chain has no
      // end we can trust, and so no place where the next one starts.
      if (ring_count > ring_.size) [[unlikely]] {
        mark_broken(ChainError::chain_unterminated);
        return std::unexpected(ChainError::chain_unterminated);
      }
      c.advance(1, ring_.size);
      // The driver made the whole chain available before its head (2.8.6), and the head's
      // acquire in pop() covers these: each is copied once, its flags included.
      d = detail::read_packed_desc_once(ring_.desc + c.pos);
      if (!detail::desc_is_avail(d.flags, c.wrap)) [[unlikely]] {
        mark_broken(ChainError::chain_unterminated);
        return std::unexpected(ChainError::chain_unterminated);
      }
      if (!bad && (d.flags & kDescFIndirect)) bad = ChainError::indirect_in_chain;
    }
    if (!bad && (d.flags & kDescFIndirect)) {
      if (!indirect_) {
        bad = ChainError::indirect_not_negotiated;
      } else if (d.flags & kDescFNext) {
        bad = ChainError::indirect_with_next;
      } else if (d.len == 0 || d.len % sizeof(virtio::PackedDesc) != 0) {
        bad = ChainError::indirect_bad_len;
      } else if (d.len / sizeof(virtio::PackedDesc) > ring_.size) {
        bad = ChainError::chain_too_long;
      } else if (auto table = detail::indirect_table(*mem_, d.addr, d.len, indirect_copy_);
                 !table) {
        bad = table.error();
      } else {
        // Entries are read in place, one memcpy each (any alignment is fine); their order is
        // the chain's, and no flag but WRITE is valid in them (2.8.7).
        const std::size_t n = d.len / sizeof(virtio::PackedDesc);
        for (std::size_t i = 0; i < n && !bad; ++i) {
          const virtio::PackedDesc e =
              detail::read_packed_desc_once(*table + i * sizeof(virtio::PackedDesc));
          ++walked;
          if (e.flags & kDescFIndirect) {
            bad = ChainError::indirect_nested;
          } else {
            bad = b.add(e.addr, e.len, (e.flags & kDescFWrite) != 0);
          }
        }
      }
    } else if (!bad) {
      bad = b.add(d.addr, d.len, (d.flags & kDescFWrite) != 0);
    }
    if (!(d.flags & kDescFNext)) break;
  }

  // The chain's descriptors are consumed whatever follows: the next chain starts after them.
  const std::uint16_t id = d.id;
  advance_avail(ring_count);
  const std::uint32_t seq = pop_seq_++;
  // No answer is possible for an id out of range, and answering a reused one would complete the
  // chain already in flight under it: the chain is dropped, counted.
  if (id >= ring_.size) [[unlikely]] {
    count(ChainError::id_out_of_range);
    return std::unexpected(ChainError::id_out_of_range);
  }
  InFlight& f = inflight_[id];
  if (f.count != 0) [[unlikely]] {
    count(ChainError::id_in_flight);
    return std::unexpected(ChainError::id_in_flight);
  }
  if (bad) [[unlikely]] {
    f = InFlight{kNeverComplete, seq, static_cast<std::uint16_t>(ring_count)};
    push_used(id, 0);
    count(*bad);
    return std::unexpected(*bad);
  }
  f = InFlight{static_cast<std::uint32_t>(b.wlen), seq, static_cast<std::uint16_t>(ring_count)};
  Chain chain;
  chain.head = id;
  chain.desc_count = static_cast<std::uint16_t>(walked);
  chain.readable = segs.first(b.nread);
  chain.writable = segs.subspan(b.nread, b.nseg - b.nread);
  chain.readable_len = b.rlen;
  chain.writable_len = b.wlen;
  return chain;
}

bool PackedDeviceQueue::needs_notify() noexcept {
  if (ring_.driver_event == nullptr) return false;
  // Full fence: orders the used flags stored by publish_used() before the load of the driver's
  // event suppression; otherwise we could read a stale "disabled" while the driver reads our
  // stale flags, and both sleep.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint32_t old_ext = signalled_ext_;
  const std::uint32_t new_ext = published_ext_;
  signalled_ext_ = new_ext;
  if (new_ext == old_ext) return false;
  const virtio::PackedEventSuppress ev = detail::load_event(ring_.driver_event);
  const std::uint16_t flags = ev.flags & virtio::kRingEventFlagsMask;
  if (flags == virtio::kRingEventFlagsDisable) return false;
  if (flags == virtio::kRingEventFlagsDesc && event_idx_) {
    return detail::packed_need_event(ev.off_wrap, new_ext, old_ext, ring_.size);
  }
  return true;  // enable, or a value we may not honour (DESC without EVENT_IDX, reserved 3)
}

void PackedDeviceQueue::disable_notifications() noexcept {
  if (ring_.device_event == nullptr || broken_) return;
  detail::store_event(ring_.device_event, 0, virtio::kRingEventFlagsDisable);
}

bool PackedDeviceQueue::enable_notifications() noexcept {
  if (ring_.device_event == nullptr || broken_) return false;
  // Ask for a kick at the first descriptor past what pending() has seen: chains seen and left
  // on the ring (an rx ring waiting for frames) must not make the caller poll again.
  detail::RingCursor seen_end = avail_;
  seen_end.advance(ahead_, ring_.size);
  if (event_idx_) {
    detail::store_event(ring_.device_event, seen_end.off_wrap(), virtio::kRingEventFlagsDesc);
  } else {
    detail::store_event(ring_.device_event, 0, virtio::kRingEventFlagsEnable);
  }
  // Full fence: orders the event store above before the re-read of the ring below. Without it
  // a driver could make a chain available, read our old "disabled" and skip the kick, while we
  // read its old flags and go to sleep.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // A full ring seen: seen_end is the first descriptor again, one lap on, and cannot be
  // available until the device has consumed it.
  const std::uint16_t flags = std::atomic_ref<std::uint16_t>(ring_.desc[seen_end.pos].flags)
                                  .load(std::memory_order_acquire);
  if (!detail::desc_is_avail(flags, seen_end.wrap)) return false;
  // New chains: they count as seen from now on, as the split ring's avail index cache does. A
  // handler that leaves them on the ring without asking pending() (an rx ring on the loopback,
  // filled from the tx side) would otherwise get true here forever and spin its worker.
  scan_avail();
  return true;
}

}  // namespace vhostkit::virtq
