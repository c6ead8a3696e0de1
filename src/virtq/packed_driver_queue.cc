// Driver side of the packed virtqueue: our own userspace driver. The device on the other end is
// as hostile as any peer: a used descriptor is checked against the ids we handed out before it
// touches our free lists.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "vhostkit/virtq/packed_queue.h"

namespace vhostkit::virtq {

namespace {

constexpr std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) & ~(a - 1); }

}  // namespace

PackedRingLayout PackedRingLayout::for_size(std::uint16_t size) noexcept {
  PackedRingLayout l;
  l.desc_offset = 0;
  l.driver_event_offset = align_up(16u * std::size_t{size}, kCacheLine);
  l.device_event_offset = l.driver_event_offset + kCacheLine;
  l.total_bytes = l.device_event_offset + kCacheLine;
  return l;
}

Result<> PackedDriverQueue::init(std::span<std::byte> ring, std::uint64_t ring_gpa,
                                 std::uint16_t size, std::uint64_t features,
                                 std::span<std::byte> indirect, std::uint64_t indirect_gpa,
                                 std::uint16_t max_indirect) {
  if (!virtio::is_valid_packed_queue_size(size)) {
    return fail(Errc::invalid_argument, "packed queue size must be 1..32768");
  }
  const PackedRingLayout layout = PackedRingLayout::for_size(size);
  if (ring.size() < layout.total_bytes) {
    return fail(Errc::out_of_range, "ring memory smaller than the layout needs");
  }
  if (reinterpret_cast<std::uintptr_t>(ring.data()) % virtio::kPackedDescAlign != 0 ||
      ring_gpa % virtio::kPackedDescAlign != 0) {
    return fail(Errc::invalid_argument, "ring memory must be 16-byte aligned");
  }
  bool use_indirect = false;
  if (virtio::has(features, virtio::feature::ring_indirect_desc) && max_indirect > 1) {
    const std::size_t need = std::size_t{size} * max_indirect * sizeof(virtio::PackedDesc);
    if (indirect.size() < need) {
      return fail(Errc::out_of_range, "indirect memory smaller than size * max_indirect tables");
    }
    if (indirect_gpa % virtio::kPackedDescAlign != 0) {
      return fail(Errc::invalid_argument, "indirect tables must be 16-byte aligned");
    }
    use_indirect = true;
  }

  std::memset(ring.data(), 0, layout.total_bytes);
  layout_ = layout;
  ring_gpa_ = ring_gpa;
  desc_ = reinterpret_cast<virtio::PackedDesc*>(ring.data() + layout.desc_offset);
  driver_event_ =
      reinterpret_cast<virtio::PackedEventSuppress*>(ring.data() + layout.driver_event_offset);
  device_event_ =
      reinterpret_cast<virtio::PackedEventSuppress*>(ring.data() + layout.device_event_offset);
  size_ = size;
  event_idx_ = virtio::has(features, virtio::feature::ring_event_idx);
  in_order_ = virtio::has(features, virtio::feature::in_order);
  use_indirect_ = use_indirect;
  interrupts_enabled_ = true;
  broken_ = false;
  avail_ = {};
  used_ = {};
  kicked_ext_ = 0;
  batch_open_ = false;
  free_desc_ = size;
  bad_used_ = 0;
  free_ids_.resize(size);
  // A stack with id 0 on top.
  for (std::uint16_t i = 0; i < size; ++i) free_ids_[i] = static_cast<std::uint16_t>(size - 1 - i);
  free_id_count_ = size;
  ids_.assign(size, IdState{});
  fifo_.assign(in_order_ ? size : 0, 0);
  fifo_head_ = 0;
  draining_ = false;
  indirect_ = use_indirect ? indirect : std::span<std::byte>{};
  indirect_gpa_ = use_indirect ? indirect_gpa : 0;
  max_indirect_ = use_indirect ? max_indirect : 0;
  // With EVENT_IDX, ask for a signal at the first used descriptor (the device's default is to
  // signal every batch, which EVENT_IDX exists to avoid).
  if (event_idx_) {
    detail::store_event(driver_event_, used_.off_wrap(), virtio::kRingEventFlagsDesc);
  }
  return {};
}

void PackedDriverQueue::write_desc(std::uint64_t addr, std::uint32_t len, std::uint16_t id,
                                   std::uint16_t flags) noexcept {
  virtio::PackedDesc& d = desc_[avail_.pos];
  d.addr = addr;
  d.len = len;
  d.id = id;
  const auto f = static_cast<std::uint16_t>(flags | detail::avail_bits(avail_.wrap));
  if (!batch_open_) {
    batch_open_ = true;
    batch_first_ = avail_.pos;
    batch_flags_ = f;
  } else {
    // Relaxed: the device reads descriptors in ring order, so it reaches this one only after
    // the batch's first, whose release store in publish() comes later.
    std::atomic_ref<std::uint16_t>(d.flags).store(f, std::memory_order_relaxed);
  }
  avail_.advance(1, size_);
}

std::expected<std::uint16_t, Errc> PackedDriverQueue::add(std::span<const Buffer> out,
                                                          std::span<const Buffer> in,
                                                          std::uint64_t token) noexcept {
  const std::size_t n = out.size() + in.size();
  if (n == 0 || desc_ == nullptr) [[unlikely]]
    return std::unexpected(Errc::invalid_argument);
  const bool indirect = use_indirect_ && n > 1 && n <= max_indirect_;
  const std::size_t needed = indirect ? 1 : n;
  if (needed > size_) [[unlikely]]
    return std::unexpected(Errc::invalid_argument);
  if (needed > free_desc_ || free_id_count_ == 0) return std::unexpected(Errc::would_block);

  std::uint64_t in_total = 0;
  for (const Buffer& b : in) in_total += b.len;
  const std::uint16_t id = free_ids_[--free_id_count_];
  if (indirect) {
    const std::size_t table_off = std::size_t{id} * max_indirect_ * sizeof(virtio::PackedDesc);
    auto* table = reinterpret_cast<virtio::PackedDesc*>(indirect_.data() + table_off);
    for (std::size_t i = 0; i < n; ++i) {
      const bool is_in = i >= out.size();
      const Buffer& b = is_in ? in[i - out.size()] : out[i];
      table[i] =
          virtio::PackedDesc{b.gpa, b.len, 0, is_in ? virtio::kDescFWrite : std::uint16_t{0}};
    }
    write_desc(indirect_gpa_ + table_off,
               static_cast<std::uint32_t>(n * sizeof(virtio::PackedDesc)), id,
               virtio::kDescFIndirect);
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const bool is_in = i >= out.size();
      const Buffer& b = is_in ? in[i - out.size()] : out[i];
      std::uint16_t flags = is_in ? virtio::kDescFWrite : 0;
      if (i + 1 < n) flags |= virtio::kDescFNext;
      write_desc(b.gpa, b.len, id, flags);
    }
  }
  ids_[id] = IdState{token,
                     static_cast<std::uint32_t>(std::min<std::uint64_t>(
                         in_total, std::numeric_limits<std::uint32_t>::max())),
                     static_cast<std::uint16_t>(needed)};
  free_desc_ = static_cast<std::uint16_t>(free_desc_ - needed);
  if (in_order_) {
    // In flight: size - free_id_count_ - 1 ids before this one.
    const std::uint32_t queued = size_ - free_id_count_ - 1u;
    fifo_[(fifo_head_ + queued) % size_] = id;
  }
  return id;
}

bool PackedDriverQueue::needs_kick() noexcept {
  if (desc_ == nullptr) return false;
  // Full fence: orders the flags store in publish() before the load of the device's event
  // suppression; otherwise we could miss the device re-enabling kicks while it misses our
  // descriptors.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint32_t old_ext = kicked_ext_;
  const std::uint32_t new_ext = avail_.ext(size_);
  kicked_ext_ = new_ext;
  if (new_ext == old_ext) return false;
  const virtio::PackedEventSuppress ev = detail::load_event(device_event_);
  const std::uint16_t flags = ev.flags & virtio::kRingEventFlagsMask;
  if (flags == virtio::kRingEventFlagsDisable) return false;
  if (flags == virtio::kRingEventFlagsDesc && event_idx_) {
    return detail::packed_need_event(ev.off_wrap, new_ext, old_ext, size_);
  }
  return true;
}

void PackedDriverQueue::release(std::uint16_t id, std::uint32_t len, Used& out) noexcept {
  IdState& s = ids_[id];
  if (len > s.in_len) [[unlikely]] {
    ++bad_used_;
    len = s.in_len;
  }
  out = Used{s.token, len, id};
  used_.advance(s.count, size_);
  free_desc_ = static_cast<std::uint16_t>(free_desc_ + s.count);
  s.count = 0;
  free_ids_[free_id_count_++] = id;
}

std::optional<PackedDriverQueue::Used> PackedDriverQueue::get_used() noexcept {
  Used u;
  return get_used_burst(std::span<Used>(&u, 1)) == 1 ? std::optional<Used>(u) : std::nullopt;
}

std::size_t PackedDriverQueue::get_used_burst(std::span<Used> out) noexcept {
  if (desc_ == nullptr || broken_) return 0;
  std::size_t got = 0;
  while (got < out.size()) {
    if (draining_) {
      // IN_ORDER: the chains up to the used id, oldest first; the ones before it were written
      // completely (2.8.21), the last one as far as the used descriptor says.
      const std::uint16_t id = fifo_[fifo_head_];
      fifo_head_ = static_cast<std::uint16_t>((fifo_head_ + 1) % size_);
      const bool last = id == drain_id_;
      release(id, last ? drain_len_ : ids_[id].in_len, out[got++]);
      if (last) draining_ = false;
      continue;
    }
    virtio::PackedDesc* slot = desc_ + used_.pos;
    // Acquire: the device wrote the used descriptor and the buffers before these flags.
    const std::uint16_t flags =
        std::atomic_ref<std::uint16_t>(slot->flags).load(std::memory_order_acquire);
    if (!detail::desc_is_used(flags, used_.wrap)) break;
    const virtio::PackedDesc e = detail::read_packed_desc_once(slot);
    const std::uint16_t id = e.id;
    if (id >= size_ || ids_[id].count == 0) [[unlikely]] {
      // Without a chain of ours behind the id we cannot tell how far to skip.
      ++bad_used_;
      broken_ = true;
      break;
    }
    // Element length is reserved without WRITE (2.8.4).
    const std::uint32_t len = (flags & virtio::kDescFWrite) ? e.len : 0;
    if (in_order_) {
      draining_ = true;
      drain_id_ = id;
      drain_len_ = len;
      continue;
    }
    release(id, len, out[got++]);
  }
  if (got != 0 && event_idx_ && interrupts_enabled_) {
    // Signal me when the device writes the next used descriptor I will read.
    detail::store_event(driver_event_, used_.off_wrap(), virtio::kRingEventFlagsDesc);
  }
  return got;
}

void PackedDriverQueue::disable_interrupts() noexcept {
  if (desc_ == nullptr) return;
  interrupts_enabled_ = false;
  detail::store_event(driver_event_, 0, virtio::kRingEventFlagsDisable);
}

bool PackedDriverQueue::enable_interrupts() noexcept {
  if (desc_ == nullptr) return false;
  interrupts_enabled_ = true;
  if (event_idx_) {
    detail::store_event(driver_event_, used_.off_wrap(), virtio::kRingEventFlagsDesc);
  } else {
    detail::store_event(driver_event_, 0, virtio::kRingEventFlagsEnable);
  }
  // Full fence: orders the event store above before the re-read of the ring below.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (draining_) return true;
  const std::uint16_t flags =
      std::atomic_ref<std::uint16_t>(desc_[used_.pos].flags).load(std::memory_order_acquire);
  return detail::desc_is_used(flags, used_.wrap);
}

}  // namespace vhostkit::virtq
