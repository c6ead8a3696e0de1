// Device side of the split virtqueue: the chain walker and the notification rules. The
// per-chain fast path (pending, pop's front, push_used, publish_used) is inline in the header.
#include <atomic>
#include <cstring>
#include <limits>

#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::virtq {

namespace {

using virtio::kDescFIndirect;
using virtio::kDescFNext;
using virtio::kDescFWrite;

}  // namespace

void DeviceQueue::attach(const memory::GuestMemory* mem, SplitRing ring, std::uint64_t features,
                         std::uint16_t last_avail_idx) noexcept {
  mem_ = mem;
  ring_ = ring;
  mask_ = static_cast<std::uint16_t>(ring.size - 1);
  event_idx_ = virtio::has(features, virtio::feature::ring_event_idx);
  indirect_ = virtio::has(features, virtio::feature::ring_indirect_desc);
  broken_ = false;
  errors_ = {};
  error_total_ = 0;
  in_order_ = false;  // set once the ring is known good, with its table sized
  merge_open_ = false;
  last_avail_idx_ = last_avail_idx;
  avail_idx_cache_ = last_avail_idx;
  used_idx_ = 0;
  published_used_idx_ = 0;
  signalled_used_idx_ = 0;
  if (mem == nullptr || ring.desc == nullptr || ring.avail == nullptr || ring.used == nullptr ||
      !virtio::is_valid_queue_size(ring.size)) {
    // Nothing sane to serve; vhost::Device validates before attaching, this is a backstop.
    broken_ = true;
    return;
  }
  // The index words are accessed through atomic_ref, which needs natural alignment (the spec's
  // part alignment guarantees it; vhost::Device checks the addresses).
  if (reinterpret_cast<std::uintptr_t>(ring.avail) % virtio::kAvailAlign != 0 ||
      reinterpret_cast<std::uintptr_t>(ring.used) % virtio::kUsedAlign != 0) {
    broken_ = true;
    return;
  }
  used_idx_ = std::atomic_ref<std::uint16_t>(ring_.used->idx).load(std::memory_order_acquire);
  published_used_idx_ = used_idx_;
  signalled_used_idx_ = used_idx_;
  in_order_ = virtio::has(features, virtio::feature::in_order);
  pop_seq_ = 0;
  // Once per ring size: a re-attach of the same size allocates nothing.
  if (in_order_) popped_.assign(ring.size, Popped{});
  if (indirect_) indirect_copy_.resize(std::size_t{ring.size} * sizeof(virtio::VirtqDesc));
}

void DeviceQueue::note_popped(std::uint16_t head, std::uint64_t writable_len) noexcept {
  popped_[head] = Popped{static_cast<std::uint32_t>(writable_len), pop_seq_++};
}

void DeviceQueue::push_used_in_order(std::uint16_t head, std::uint32_t len) noexcept {
  const Popped p = head < ring_.size ? popped_[head] : Popped{kNeverComplete, 0};
  // The run may grow only by the chain popped right after its last one, and only when that one
  // was written completely: the driver takes every chain the element skips as used in full.
  if (merge_open_ && merge_complete_ && head < ring_.size && p.seq == merge_seq_ + 1) {
    virtio::VirtqUsedElem& e = ring_.used->ring[merge_slot_];
    e.id = head;
    e.len = len;
  } else {
    merge_slot_ = used_idx_ & mask_;
    virtio::VirtqUsedElem& e = ring_.used->ring[merge_slot_];
    e.id = head;
    e.len = len;
    merge_open_ = true;
  }
  merge_seq_ = p.seq;
  merge_complete_ = head < ring_.size && len == p.writable;
  ++used_idx_;
}

void DeviceQueue::detach() noexcept {
  mem_ = nullptr;
  ring_ = {};
  mask_ = 0;
  broken_ = false;
  in_order_ = false;
  merge_open_ = false;
}

void DeviceQueue::count(ChainError e) noexcept {
  if (e != ChainError::empty && e != ChainError::kCount) {
    ++errors_[static_cast<std::size_t>(e)];
    ++error_total_;
  }
}

void DeviceQueue::mark_broken(ChainError e) noexcept {
  count(e);
  broken_ = true;
}

std::expected<Chain, ChainError> DeviceQueue::pop_slow(std::span<iovec> segs) noexcept {
  if (broken_ || ring_.avail == nullptr) return std::unexpected(ChainError::queue_broken);
  if (pending() == 0) {
    return std::unexpected(broken_ ? ChainError::queue_broken : ChainError::empty);
  }
  return pop(segs);
}

std::expected<Chain, ChainError> DeviceQueue::take(std::uint16_t head,
                                                   std::span<iovec> segs) noexcept {
  if (broken_ || ring_.desc == nullptr) return std::unexpected(ChainError::queue_broken);
  if (head >= ring_.size) {
    count(ChainError::head_out_of_range);
    return std::unexpected(ChainError::head_out_of_range);
  }
  const virtio::VirtqDesc d = detail::read_desc_once(ring_.desc + head);
  auto chain = walk(head, d, segs);
  if (in_order_) note_popped(head, chain ? chain->writable_len : kNeverComplete);
  if (!chain) {
    push_used(head, 0);
    last_bad_head_ = head;
    count(chain.error());
  }
  return chain;
}

std::expected<Chain, ChainError> DeviceQueue::walk(std::uint16_t head,
                                                   const virtio::VirtqDesc& first,
                                                   std::span<iovec> segs) noexcept {
  // Untyped: an indirect table need not be aligned.
  const std::byte* table = reinterpret_cast<const std::byte*>(ring_.desc);
  std::uint32_t table_size = ring_.size;
  std::uint16_t idx = head;
  bool in_indirect = false;
  bool writing = false;
  // Every buffer descriptor walked counts, in the ring's table and in an indirect one: a chain
  // can't be longer than the queue, which is also what ends a `next` loop. The descriptor that
  // points at an indirect table is not a buffer and gets one extra step.
  std::uint32_t walked = 0;
  std::uint32_t limit = ring_.size;
  std::size_t nseg = 0;
  std::size_t nread = 0;
  std::uint64_t rlen = 0;
  std::uint64_t wlen = 0;

  for (;;) {
    if (++walked > limit) [[unlikely]]
      return std::unexpected(ChainError::chain_too_long);
    // The head was copied by pop(); everything after it is copied here, once each.
    const virtio::VirtqDesc d =
        walked == 1 ? first
                    : detail::read_desc_once(table + std::size_t{idx} * sizeof(virtio::VirtqDesc));

    if (d.flags & kDescFIndirect) [[unlikely]] {
      if (in_indirect) return std::unexpected(ChainError::indirect_nested);
      if (!indirect_) return std::unexpected(ChainError::indirect_not_negotiated);
      if (d.flags & kDescFNext) return std::unexpected(ChainError::indirect_with_next);
      if (d.len == 0 || d.len % sizeof(virtio::VirtqDesc) != 0) {
        return std::unexpected(ChainError::indirect_bad_len);
      }
      // Read in place (memcpy per entry, so any alignment is fine), or from a copy when the
      // table spans regions.
      auto p = detail::indirect_table(*mem_, d.addr, d.len, indirect_copy_);
      if (!p) return std::unexpected(p.error());
      table = reinterpret_cast<const std::byte*>(*p);
      table_size = d.len / sizeof(virtio::VirtqDesc);
      idx = 0;
      in_indirect = true;
      ++limit;
      continue;
    }

    if (d.len != 0) {
      if (d.addr + d.len < d.addr) [[unlikely]] {
        return std::unexpected(ChainError::desc_len_wraps);
      }
      if (d.flags & kDescFWrite) {
        writing = true;
        wlen += d.len;
      } else {
        if (writing) [[unlikely]]
          return std::unexpected(ChainError::readable_after_writable);
        rlen += d.len;
      }
      if (rlen + wlen > detail::kMaxChainBytes) [[unlikely]] {
        return std::unexpected(ChainError::total_too_large);
      }
      auto pieces = mem_->gpa_to_iovec(d.addr, d.len, segs.subspan(nseg));
      if (!pieces) [[unlikely]]
        return std::unexpected(detail::from_xlate(pieces.error()));
      nseg += *pieces;
      if (!writing) nread = nseg;
    }

    if (!(d.flags & kDescFNext)) break;
    idx = d.next;
    if (idx >= table_size) [[unlikely]]
      return std::unexpected(ChainError::next_out_of_range);
  }

  Chain c;
  c.head = head;
  c.desc_count = static_cast<std::uint16_t>(walked);
  c.readable = segs.first(nread);
  c.writable = segs.subspan(nread, nseg - nread);
  c.readable_len = rlen;
  c.writable_len = wlen;
  return c;
}

bool DeviceQueue::needs_notify() noexcept {
  if (ring_.avail == nullptr) return false;
  // Full fence: orders our used->idx store before the load of used_event / avail->flags below;
  // otherwise we could read a stale used_event while the driver reads our stale used->idx, and
  // both sleep.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const std::uint16_t old_idx = signalled_used_idx_;
  const std::uint16_t new_idx = published_used_idx_;
  signalled_used_idx_ = new_idx;
  if (event_idx_) {
    const std::uint16_t used_event =
        std::atomic_ref<std::uint16_t>(*used_event_word(ring_.avail, ring_.size))
            .load(std::memory_order_relaxed);
    return virtio::vring_need_event(used_event, new_idx, old_idx);
  }
  if (new_idx == old_idx) return false;
  const std::uint16_t flags =
      std::atomic_ref<std::uint16_t>(ring_.avail->flags).load(std::memory_order_relaxed);
  return (flags & virtio::kAvailFNoInterrupt) == 0;
}

void DeviceQueue::disable_notifications() noexcept {
  if (ring_.used == nullptr || broken_) return;
  // With EVENT_IDX the driver ignores the flag; we simply stop moving avail_event, so it
  // kicks at most once more (when it passes the last value we wrote).
  if (!event_idx_) {
    std::atomic_ref<std::uint16_t>(ring_.used->flags)
        .store(virtio::kUsedFNoNotify, std::memory_order_relaxed);
    log_used_word(&ring_.used->flags);
  }
}

void DeviceQueue::log_used_word(std::uint16_t* word) const noexcept {
  // Live migration: these words live in the used ring, which the owner marks when it publishes
  // used elements; a ring that goes quiet after changing them publishes nothing more, so they
  // are marked here, or the destination would start with the driver's kicks suppressed.
  const iovec v{word, sizeof *word};
  log_write({&v, 1}, sizeof *word);
}

bool DeviceQueue::enable_notifications() noexcept {
  if (ring_.used == nullptr || broken_) return false;
  // Ask for a kick when the driver publishes past what we have already seen, not past what we
  // have popped: a handler may leave chains on the ring on purpose (an rx ring with buffers but
  // no frames, a port that can't take more), and re-polling those would spin the worker.
  const std::uint16_t seen = avail_idx_cache_;
  std::uint16_t* const word =
      event_idx_ ? avail_event_word(ring_.used, ring_.size) : &ring_.used->flags;
  std::atomic_ref<std::uint16_t>(*word).store(event_idx_ ? seen : 0, std::memory_order_relaxed);
  log_used_word(word);
  // Full fence: orders the avail_event / flags store above before the re-read of avail->idx
  // below. Without it a driver could publish, read our old avail_event/flags and skip the
  // kick, while we read its old avail->idx and go to sleep.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // Acquire: chains published before this idx are readable when the caller pops them.
  const std::uint16_t idx =
      std::atomic_ref<std::uint16_t>(ring_.avail->idx).load(std::memory_order_acquire);
  if (static_cast<std::uint16_t>(idx - last_avail_idx_) > ring_.size) {
    mark_broken(ChainError::avail_idx_runaway);
    return false;
  }
  avail_idx_cache_ = idx;
  // True only for chains published since we last looked (Linux vhost_enable_notify's rule).
  return idx != seen;
}

}  // namespace vhostkit::virtq
