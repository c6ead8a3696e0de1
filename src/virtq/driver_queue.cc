// Driver side of the split virtqueue: our own userspace driver (the vhost-user frontend and
// the tests). The device on the other end is as hostile as any peer: a used element is checked
// against what we handed out before it touches the free list.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::virtq {

namespace {

constexpr std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) & ~(a - 1); }

// The used ring starts on its own cache line so the device's used-side writes do not bounce
// the line holding the driver's avail idx.
constexpr std::size_t kUsedAlignLayout = 64;

}  // namespace

DriverRingLayout DriverRingLayout::for_size(std::uint16_t size) noexcept {
  DriverRingLayout l;
  l.desc_offset = 0;
  l.avail_offset = align_up(virtio::desc_table_bytes(size), virtio::kAvailAlign);
  l.used_offset = align_up(l.avail_offset + virtio::avail_ring_bytes(size), kUsedAlignLayout);
  l.total_bytes = align_up(l.used_offset + virtio::used_ring_bytes(size), kUsedAlignLayout);
  return l;
}

Result<> DriverQueue::init(std::span<std::byte> ring, std::uint64_t ring_gpa, std::uint16_t size,
                           std::uint64_t features, std::span<std::byte> indirect,
                           std::uint64_t indirect_gpa, std::uint16_t max_indirect) {
  if (!virtio::is_valid_queue_size(size)) {
    return fail(Errc::invalid_argument, "queue size must be a power of two up to 32768");
  }
  const DriverRingLayout layout = DriverRingLayout::for_size(size);
  if (ring.size() < layout.total_bytes) {
    return fail(Errc::out_of_range, "ring memory smaller than the layout needs");
  }
  if (reinterpret_cast<std::uintptr_t>(ring.data()) % virtio::kDescAlign != 0 ||
      ring_gpa % virtio::kDescAlign != 0) {
    return fail(Errc::invalid_argument, "ring memory must be 16-byte aligned");
  }
  bool use_indirect = false;
  if (virtio::has(features, virtio::feature::ring_indirect_desc) && max_indirect > 1) {
    const std::size_t need = std::size_t{size} * max_indirect * sizeof(virtio::VirtqDesc);
    if (indirect.size() < need) {
      return fail(Errc::out_of_range, "indirect memory smaller than size * max_indirect tables");
    }
    if (indirect_gpa % virtio::kDescAlign != 0) {
      return fail(Errc::invalid_argument, "indirect tables must be 16-byte aligned");
    }
    use_indirect = true;
  }

  std::memset(ring.data(), 0, layout.total_bytes);
  layout_ = layout;
  ring_gpa_ = ring_gpa;
  desc_ = reinterpret_cast<virtio::VirtqDesc*>(ring.data() + layout.desc_offset);
  avail_ = reinterpret_cast<virtio::VirtqAvail*>(ring.data() + layout.avail_offset);
  used_ = reinterpret_cast<virtio::VirtqUsed*>(ring.data() + layout.used_offset);
  size_ = size;
  mask_ = static_cast<std::uint16_t>(size - 1);
  event_idx_ = virtio::has(features, virtio::feature::ring_event_idx);
  use_indirect_ = use_indirect;
  interrupts_enabled_ = true;
  avail_idx_ = 0;
  kicked_avail_idx_ = 0;
  last_used_idx_ = 0;
  used_idx_cache_ = 0;
  bad_used_ = 0;
  free_.resize(size);
  // A stack with descriptor 0 on top.
  for (std::uint16_t i = 0; i < size; ++i) free_[i] = static_cast<std::uint16_t>(size - 1 - i);
  free_count_ = size;
  slots_.assign(size, Slot{});
  indirect_ = use_indirect ? indirect : std::span<std::byte>{};
  indirect_gpa_ = use_indirect ? indirect_gpa : 0;
  max_indirect_ = use_indirect ? max_indirect : 0;
  in_order_ = virtio::has(features, virtio::feature::in_order);
  next_desc_ = 0;
  oldest_head_ = 0;
  drain_left_ = 0;
  drain_len_ = 0;
  return {};
}

std::expected<std::uint16_t, Errc> DriverQueue::add(std::span<const Buffer> out,
                                                    std::span<const Buffer> in,
                                                    std::uint64_t token) noexcept {
  const std::size_t n = out.size() + in.size();
  if (n == 1 && free_count_ != 0 && !in_order_) [[likely]] {
    // One buffer: one descriptor, never indirect.
    const bool is_in = out.empty();
    const Buffer& b = is_in ? in[0] : out[0];
    const std::uint16_t head = free_[--free_count_];
    const virtio::VirtqDesc d{b.gpa, b.len, is_in ? virtio::kDescFWrite : std::uint16_t{0}, 0};
    // A pool that gives each buffer the same descriptor every time (our rx refill and tx free
    // stacks do) finds it already right. Storing it anyway would take the line away from the
    // device's core, which would then miss on reading it; comparing keeps it shared.
    if (std::memcmp(&desc_[head], &d, sizeof d) != 0) desc_[head] = d;
    slots_[head] = Slot{token, is_in ? b.len : 0, 1, 0};
    avail_->ring[avail_idx_ & mask_] = head;
    ++avail_idx_;
    return head;
  }
  if (n == 0 || desc_ == nullptr) [[unlikely]]
    return std::unexpected(Errc::invalid_argument);
  const bool indirect = use_indirect_ && n > 1 && n <= max_indirect_;
  const std::size_t needed = indirect ? 1 : n;
  if (needed > free_count_) [[unlikely]] {
    return std::unexpected(n > size_ && !indirect ? Errc::invalid_argument : Errc::would_block);
  }

  std::uint64_t in_total = 0;
  for (const Buffer& b : in) in_total += b.len;

  std::uint16_t head;
  if (in_order_) {
    // Ring order (2.7.5): the chain takes the next `needed` descriptors, wrapping at the end.
    head = next_desc_;
    next_desc_ = static_cast<std::uint16_t>((head + needed) & mask_);
    free_count_ = static_cast<std::uint16_t>(free_count_ - needed);
  } else {
    head = free_[--free_count_];
  }
  if (indirect) {
    const std::size_t table_off = std::size_t{head} * max_indirect_ * sizeof(virtio::VirtqDesc);
    auto* table = reinterpret_cast<virtio::VirtqDesc*>(indirect_.data() + table_off);
    for (std::size_t i = 0; i < n; ++i) {
      const bool is_in = i >= out.size();
      const Buffer& b = is_in ? in[i - out.size()] : out[i];
      std::uint16_t flags = is_in ? virtio::kDescFWrite : 0;
      if (i + 1 < n) flags |= virtio::kDescFNext;
      table[i] = virtio::VirtqDesc{b.gpa, b.len, flags, static_cast<std::uint16_t>(i + 1)};
    }
    desc_[head] = virtio::VirtqDesc{indirect_gpa_ + table_off,
                                    static_cast<std::uint32_t>(n * sizeof(virtio::VirtqDesc)),
                                    virtio::kDescFIndirect, 0};
    slots_[head].chain_len = 1;
  } else {
    std::uint16_t cur = head;
    for (std::size_t i = 0; i < n; ++i) {
      const bool is_in = i >= out.size();
      const Buffer& b = is_in ? in[i - out.size()] : out[i];
      std::uint16_t flags = is_in ? virtio::kDescFWrite : 0;
      std::uint16_t nxt = 0;
      if (i + 1 < n) {
        nxt = in_order_ ? static_cast<std::uint16_t>((cur + 1) & mask_) : free_[--free_count_];
        flags |= virtio::kDescFNext;
      }
      slots_[cur].next = nxt;
      desc_[cur] = virtio::VirtqDesc{b.gpa, b.len, flags, nxt};
      cur = nxt;
    }
    slots_[head].chain_len = static_cast<std::uint16_t>(n);
  }
  slots_[head].token = token;
  slots_[head].in_len = static_cast<std::uint32_t>(
      std::min<std::uint64_t>(in_total, std::numeric_limits<std::uint32_t>::max()));
  avail_->ring[avail_idx_ & mask_] = head;
  ++avail_idx_;
  return head;
}

bool DriverQueue::needs_kick() noexcept {
  if (avail_ == nullptr) return false;
  // Full fence: orders the avail->idx store in publish() before the load of avail_event /
  // used->flags; otherwise we could miss the device re-enabling kicks while it misses our idx.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint16_t old_idx = kicked_avail_idx_;
  const std::uint16_t new_idx = avail_idx_;
  kicked_avail_idx_ = new_idx;
  if (event_idx_) {
    const std::uint16_t avail_event =
        std::atomic_ref<std::uint16_t>(*avail_event_word(used_, size_))
            .load(std::memory_order_relaxed);
    return virtio::vring_need_event(avail_event, new_idx, old_idx);
  }
  if (new_idx == old_idx) return false;
  const std::uint16_t flags =
      std::atomic_ref<std::uint16_t>(used_->flags).load(std::memory_order_relaxed);
  return (flags & virtio::kUsedFNoNotify) == 0;
}

// A device cannot have completed more chains than the ring holds.
static inline bool used_distance_ok(std::uint16_t idx, std::uint16_t last, std::uint16_t size) {
  return static_cast<std::uint16_t>(idx - last) <= size;
}

bool DriverQueue::reclaim(std::uint16_t slot, Used& out) noexcept {
  virtio::VirtqUsedElem e;
  std::memcpy(&e, &used_->ring[slot], sizeof e);
  // Compiler-only fence: the checks below run on this copy, never on a second shared read.
  std::atomic_signal_fence(std::memory_order_seq_cst);
  if (e.id >= size_ || slots_[e.id].chain_len == 0) [[unlikely]] {
    ++bad_used_;
    return false;
  }
  const auto head = static_cast<std::uint16_t>(e.id);
  Slot& h = slots_[head];
  std::uint32_t len = e.len;
  if (len > h.in_len) [[unlikely]] {
    ++bad_used_;
    len = h.in_len;
  }
  // Return the chain's descriptors by our own links, never the shared next fields.
  std::uint16_t d = head;
  for (std::uint16_t i = h.chain_len; i != 0; --i) {
    free_[free_count_++] = d;
    d = slots_[d].next;
  }
  h.chain_len = 0;
  out = Used{h.token, len, head};
  return true;
}

std::optional<DriverQueue::Used> DriverQueue::get_used() noexcept {
  Used u;
  return get_used_burst(std::span<Used>(&u, 1)) == 1 ? std::optional<Used>(u) : std::nullopt;
}

bool DriverQueue::used_ready() noexcept {
  if (last_used_idx_ != used_idx_cache_) return true;
  // Acquire: the used elements the device wrote before idx are visible after it.
  const std::uint16_t idx =
      std::atomic_ref<std::uint16_t>(used_->idx).load(std::memory_order_acquire);
  if (idx == last_used_idx_) return false;
  if (!used_distance_ok(idx, last_used_idx_, size_)) [[unlikely]] {
    ++bad_used_;  // more used than the ring holds: a broken device; take nothing
    return false;
  }
  used_idx_cache_ = idx;
  return true;
}

std::size_t DriverQueue::get_used_burst(std::span<Used> out) noexcept {
  if (used_ == nullptr) return 0;
  if (in_order_) return get_used_in_order(out);
  std::size_t got = 0;
  while (got < out.size()) {
    if (!used_ready()) break;
    const std::uint16_t slot = last_used_idx_ & mask_;
    ++last_used_idx_;
    if (reclaim(slot, out[got])) ++got;
  }
  if (got != 0 && event_idx_ && interrupts_enabled_) {
    // Interrupt me when used->idx moves past what I have consumed.
    std::atomic_ref<std::uint16_t>(*used_event_word(avail_, size_))
        .store(last_used_idx_, std::memory_order_relaxed);
  }
  return got;
}

std::size_t DriverQueue::get_used_in_order(std::span<Used> out) noexcept {
  std::size_t got = 0;
  while (got < out.size()) {
    if (drain_left_ != 0) {
      // The chains a used element stands for, oldest first; all but the last written in full.
      Slot& h = slots_[oldest_head_];
      std::uint32_t len = h.in_len;
      if (--drain_left_ == 0) {
        len = drain_len_;
        if (len > h.in_len) [[unlikely]] {
          ++bad_used_;
          len = h.in_len;
        }
      }
      out[got++] = Used{h.token, len, oldest_head_};
      free_count_ = static_cast<std::uint16_t>(free_count_ + h.chain_len);
      const std::uint16_t next = static_cast<std::uint16_t>((oldest_head_ + h.chain_len) & mask_);
      h.chain_len = 0;
      oldest_head_ = next;
      continue;
    }
    if (!used_ready()) break;
    virtio::VirtqUsedElem e;
    std::memcpy(&e, &used_->ring[last_used_idx_ & mask_], sizeof e);
    // Compiler-only fence: the checks below run on this copy, never on a second shared read.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    // How many chains, from the oldest in flight, the element stands for. In-flight heads follow
    // each other in ring order, so the walk meets e.id if it is one of them.
    std::uint16_t chains = 0;
    if (e.id < size_ && slots_[e.id].chain_len != 0) {
      for (std::uint16_t h = oldest_head_; slots_[h].chain_len != 0 && chains < size_;) {
        ++chains;
        if (h == e.id) break;
        h = static_cast<std::uint16_t>((h + slots_[h].chain_len) & mask_);
      }
    }
    const auto published = static_cast<std::uint16_t>(used_idx_cache_ - last_used_idx_);
    if (chains == 0 || chains > published) [[unlikely]] {
      // Not a chain of ours, or more chains than the device says it used: skip the element.
      ++bad_used_;
      ++last_used_idx_;
      continue;
    }
    last_used_idx_ = static_cast<std::uint16_t>(last_used_idx_ + chains);
    drain_left_ = chains;
    drain_len_ = e.len;
  }
  if (got != 0 && event_idx_ && interrupts_enabled_) {
    std::atomic_ref<std::uint16_t>(*used_event_word(avail_, size_))
        .store(last_used_idx_, std::memory_order_relaxed);
  }
  return got;
}

void DriverQueue::disable_interrupts() noexcept {
  if (avail_ == nullptr) return;
  interrupts_enabled_ = false;
  // With EVENT_IDX the device ignores the flag; we stop moving used_event instead.
  if (!event_idx_) {
    std::atomic_ref<std::uint16_t>(avail_->flags)
        .store(virtio::kAvailFNoInterrupt, std::memory_order_relaxed);
  }
}

bool DriverQueue::enable_interrupts() noexcept {
  if (avail_ == nullptr) return false;
  interrupts_enabled_ = true;
  if (event_idx_) {
    std::atomic_ref<std::uint16_t>(*used_event_word(avail_, size_))
        .store(last_used_idx_, std::memory_order_relaxed);
  } else {
    std::atomic_ref<std::uint16_t>(avail_->flags).store(0, std::memory_order_relaxed);
  }
  // Full fence: orders the used_event / flags store above before the re-read of used->idx.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint16_t idx =
      std::atomic_ref<std::uint16_t>(used_->idx).load(std::memory_order_acquire);
  return idx != last_used_idx_ || drain_left_ != 0;
}

}  // namespace vhostkit::virtq
