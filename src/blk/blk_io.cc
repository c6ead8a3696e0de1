// The virtio-blk request path: parse a popped chain (parse_blk_request, blk_request.cc), then
// either submit the request to the queue's io_uring and answer it when its completion arrives (in
// any order), or, on the inline path (an image in memory, see IoPath), run its system call on the
// worker and answer it at once. A refused request is answered as parse says: a chain with no
// writable byte gets used len 0 and a counter; any other gets VIRTIO_BLK_S_IOERR (UNSUPP for
// unknown types and features not negotiated).
#include <fcntl.h>
#include <linux/falloc.h>
#include <type_traits>

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "blk_queue.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtq/iov.h"

namespace vhostkit::blk {

namespace {

// Chains popped per handle_queue call: one submit per batch.
constexpr unsigned kBatch = 32;

// In a CQE's user data, next to the slot index: the completion is the I/O's own (not the timer
// that holds its answer back, see Backing::delayed).
constexpr std::uint64_t kIoCqe = std::uint64_t{1} << 32;

// Every piece starts and ends on an `align` boundary (what O_DIRECT takes).
bool aligned(std::span<const iovec> v, std::uint32_t align) {
  for (const iovec& seg : v) {
    if ((reinterpret_cast<std::uintptr_t>(seg.iov_base) | seg.iov_len) & (align - 1)) return false;
  }
  return true;
}

}  // namespace

void BlkDevice::QueueState::start(vhost::Queue& q, vhost::Worker& w) {
  if (!slots) {
    slots = std::make_unique<Slot[]>(BlkDevice::kMaxInflight);
    free_slots.reserve(BlkDevice::kMaxInflight);
  }
  free_slots.clear();
  for (std::uint32_t i = BlkDevice::kMaxInflight; i-- > 0;) free_slots.push_back(i);
  inflight = 0;
  // The inflight region records split rings only (InflightSplitQueue): a packed ring runs
  // untracked, so a restarted back-end does not resubmit its requests.
  tracked = q.packed() ? nullptr : q.inflight();
  resubmit = q.take_resubmit();
  if (q.packed()) resubmit.clear();
  resubmit_next = 0;
  counters.inflight.store(0, std::memory_order_relaxed);
  ring_ok = false;
  if (backing->inline_io) return;  // requests are answered by plain calls on the worker
  // A delayed request takes two SQEs: the I/O and its timer.
  const unsigned entries = BlkDevice::kMaxInflight * (backing->delayed ? 2 : 1);
  if (int r = io_uring_queue_init(entries, &ring, 0); r < 0) {
    spdlog::error("blk: vring {}: io_uring setup failed ({}); requests get IOERR", q.index(),
                  std::strerror(-r));
    return;
  }
  // The ring's own fd is readable while its completion queue holds entries (level-triggered,
  // as reap() empties it): watching it saves the read of a registered eventfd per wake-up, a
  // system call of about a microsecond on a guest.
  auto id = w.watch(ring.ring_fd, [this, &q] { on_completion(q); });
  if (!id) {
    spdlog::error("blk: vring {}: cannot watch completions ({}); requests get IOERR", q.index(),
                  id.error().message());
    io_uring_queue_exit(&ring);
    return;
  }
  watch_id = *id;
  ring_ok = true;
}

void BlkDevice::QueueState::drain(vhost::Queue& q) {
  if (!ring_ok) return;
  // Every request in flight is finished and answered while the ring and memory are still
  // there; after this nothing the kernel completes can reach guest memory through us.
  io_uring_submit(&ring);
  while (inflight > 0) {
    io_uring_cqe* cqe = nullptr;
    const int r = io_uring_wait_cqe(&ring, &cqe);
    if (r == -EINTR) continue;
    if (r < 0) {
      spdlog::error("blk: vring {}: waiting for {} request(s) failed: {}", q.index(), inflight,
                    std::strerror(-r));
      break;
    }
    reap(q);
  }
  q.publish_and_notify();
}

void BlkDevice::QueueState::stop(vhost::Queue& q, vhost::Worker& w) {
  // Heads not yet resubmitted stay in flight in the region: the next start finds them again.
  resubmit.clear();
  resubmit_next = 0;
  if (!ring_ok) {
    tracked = nullptr;
    return;
  }
  drain(q);
  tracked = nullptr;  // after the drain, whose answers are recorded
  if (watch_id != 0) w.unwatch(std::exchange(watch_id, 0));
  // Exiting the ring also cancels and waits for anything left (the error case above).
  io_uring_queue_exit(&ring);
  ring_ok = false;
}

void BlkDevice::QueueState::on_completion(vhost::Queue& q) noexcept {
  if (!q.started()) return;
  unsigned work = reap(q);
  // Slots just freed may let chains waiting on the ring in (we stopped popping when full).
  work += pop_and_submit(q);
  if (work != 0) q.publish_and_notify();
}

unsigned BlkDevice::QueueState::reap(vhost::Queue& q) noexcept {
  if (!ring_ok || inflight == 0) return 0;
  unsigned total = 0;
  io_uring_cqe* cqes[kBatch];
  for (;;) {
    const unsigned n = io_uring_peek_batch_cqe(&ring, cqes, kBatch);
    if (n == 0) break;
    for (unsigned i = 0; i < n; ++i) {
      const std::uint64_t data = io_uring_cqe_get_data64(cqes[i]);
      const int res = cqes[i]->res;
      io_uring_cqe_seen(&ring, cqes[i]);
      const auto idx = static_cast<std::uint32_t>(data);
      if (idx >= BlkDevice::kMaxInflight) continue;  // not ours (never happens)
      Slot& s = slots[idx];
      // A delayed request's timer ends with -ETIME, or -ECANCELED when the I/O failed and broke
      // the link; either way the answer is the I/O's result, whichever of the two comes last.
      if ((data & kIoCqe) != 0) s.res = res;
      if (--s.cqes_left != 0) continue;
      --inflight;
      complete(q, idx, s.res);
    }
    total += n;
  }
  counters.inflight.store(inflight, std::memory_order_relaxed);
  // A retried request (see complete) was prepared but not yet submitted.
  if (io_uring_sq_ready(&ring) != 0) io_uring_submit(&ring);
  return total;
}

unsigned BlkDevice::QueueState::pop_and_submit(vhost::Queue& q) noexcept {
  // One branch on the ring's layout per batch; the loop runs on the concrete ring type.
  return q.visit([&](auto& vq) { return pop_and_submit_on(q, vq); });
}

template <class Ring>
unsigned BlkDevice::QueueState::pop_and_submit_on(vhost::Queue& q, Ring& vq) noexcept {
  unsigned popped = 0;
  unsigned prepared = 0;
  while (popped < kBatch && !free_slots.empty()) {
    const std::uint32_t idx = free_slots.back();
    Slot& s = slots[idx];
    auto next = next_chain(vq, std::span<iovec>(s.segs, Slot::kSegs));
    if (!next) break;
    auto& chain = *next;
    ++popped;
    if (!chain) {
      // Answered by the queue (used len 0) and counted there; a broken ring stops here.
      if (virtq::breaks_queue(chain.error())) break;
      continue;
    }
    q.stats().add(q.stats().chains);
    s.head = chain->head;
    if (dispatch(q, s, idx, *chain)) {
      free_slots.pop_back();
      ++inflight;
      ++prepared;
    }
  }
  if (prepared != 0) {
    io_uring_submit(&ring);
    counters.inflight.store(inflight, std::memory_order_relaxed);
  }
  return popped;
}

template <class Ring>
std::optional<std::expected<virtq::Chain, virtq::ChainError>> BlkDevice::QueueState::next_chain(
    Ring& vq, std::span<iovec> segs) noexcept {
  if constexpr (!std::is_same_v<Ring, virtq::DeviceQueue>) {
    // Packed: no inflight tracking, nothing to resubmit (see start()).
    if (vq.pending() == 0) return std::nullopt;
    return vq.pop(segs);
  } else {
    return next_split_chain(vq, segs);
  }
}

std::optional<std::expected<virtq::Chain, virtq::ChainError>>
BlkDevice::QueueState::next_split_chain(virtq::DeviceQueue& vq, std::span<iovec> segs) noexcept {
  while (resubmit_next < resubmit.size()) {
    // Taken and never answered by the previous back-end: served again, in their original
    // order, before anything new. Not recorded again: each keeps its submission counter, so
    // a second crash still finds them in that order.
    const std::uint16_t head = resubmit[resubmit_next++];
    auto chain = vq.take(head, segs);
    // A head past the ring (recover() bounds them; take checks again) names no chain: skipped.
    if (!chain && chain.error() == virtq::ChainError::head_out_of_range) continue;
    if (!chain && !virtq::breaks_queue(chain.error()) && tracked != nullptr) {
      tracked->used(head);  // the queue answered it (used len 0)
    }
    return chain;
  }
  if (vq.pending() == 0) return std::nullopt;
  auto chain = vq.pop(segs);
  if (tracked != nullptr) {
    if (chain) {
      tracked->submit(chain->head);
    } else if (!virtq::breaks_queue(chain.error())) {
      // The queue answered it (used len 0): recorded like any request, so the count of heads
      // taken from the avail ring stays what recovery computes after a crash.
      tracked->submit(vq.last_bad_head());
      tracked->used(vq.last_bad_head());
    }
  }
  return chain;
}

void BlkDevice::QueueState::push_used(vhost::Queue& q, std::uint16_t head,
                                      std::uint32_t len) noexcept {
  q.visit([&](auto& vq) { vq.push_used(head, len); });
  if (tracked != nullptr) tracked->used(head);
}

void BlkDevice::QueueState::finish(vhost::Queue& q, Slot& s, std::uint8_t status,
                                   std::uint32_t used_len) noexcept {
  // The status byte goes last, after the data the request moved; the used element after it.
  *s.req.status = status;
  // Live migration: what the device wrote into guest memory is marked before the used element
  // is published: a read's (or GET_ID's) data, then the status byte.
  const iovec status_byte{s.req.status, 1};
  q.visit([&](auto& vq) {
    if (s.req.op == BlkOp::read || s.req.op == BlkOp::get_id)
      vq.log_write(s.req.data, s.req.length);
    vq.log_write({&status_byte, 1}, 1);
  });
  push_used(q, s.head, used_len);
}

bool BlkDevice::QueueState::dispatch(vhost::Queue& q, Slot& s, std::uint32_t slot_index,
                                     const virtq::Chain& chain) noexcept {
  const BlkChain c{chain.readable, chain.writable, chain.readable_len, chain.writable_len};
  auto req = parse_blk_request(c, backing->limits, s.data);
  if (!req) [[unlikely]] {
    refuse(q, s, req.error());
    return false;
  }
  s.req = *req;
  return submit(q, s, slot_index);
}

void BlkDevice::QueueState::refuse(vhost::Queue& q, Slot& s, const BlkRefusal& r) noexcept {
  if (r.reason == BlkRefusalReason::no_status_byte) {
    push_used(q, s.head, 0);
    counters.no_status.add();
    return;
  }
  counters.bad_requests.add();
  s.req = BlkRequest{};  // nothing of the slot's last request may be answered or logged
  s.req.status = r.status;
  finish(q, s, r.answer, 1);
}

bool BlkDevice::QueueState::submit(vhost::Queue& q, Slot& s, std::uint32_t slot_index) noexcept {
  const Backing& b = *backing;
  const BlkRequest& r = s.req;
  s.on_buffered = false;
  switch (r.op) {
    case BlkOp::get_id: {
      // The serial, zero-padded to 20 bytes (no terminator when it fills all 20), cut to fit.
      std::uint8_t id[virtio::kBlkIdBytes]{};
      std::memcpy(id, b.serial->data(), std::min(b.serial->size(), sizeof id));
      virtq::iov_write(r.data, 0, id, r.length);
      counters.get_ids.add();
      finish(q, s, virtio::kBlkSOk, static_cast<std::uint32_t>(r.length + 1));
      return false;
    }
    case BlkOp::read:
    case BlkOp::write:
      if (r.length == 0) {
        finish(q, s, virtio::kBlkSOk, 1);
        return false;
      }
      // O_DIRECT takes only aligned buffers and offsets; anything else goes the buffered way.
      s.on_buffered = !b.direct || r.offset() % b.dio_align != 0 || !aligned(r.data, b.dio_align);
      break;
    case BlkOp::flush:
    case BlkOp::discard:
    case BlkOp::write_zeroes: break;
  }
  if (b.inline_io) {
    int res = run_inline(s);
    while (second_chance(s, res)) res = run_inline(s);
    answer(q, s, res);
    return false;
  }
  if (!ring_ok || !prep(s, slot_index)) {
    counters.io_errors.add();
    finish(q, s, virtio::kBlkSIoErr, 1);
    return false;
  }
  return true;
}

bool BlkDevice::QueueState::prep(Slot& s, std::uint32_t slot_index) noexcept {
  const Backing& b = *backing;
  // Neither can fail: the SQ has room for every slot's SQEs (checked all the same; a delayed
  // request needs its timer's SQE too, which must not be found missing after the I/O's).
  if (b.delayed && io_uring_sq_space_left(&ring) < 2) return false;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (sqe == nullptr) return false;
  const BlkRequest& r = s.req;
  const int fd = s.on_buffered ? b.buffered_fd : b.fd;
  const auto n = static_cast<unsigned>(r.data.size());
  switch (r.op) {
    case BlkOp::read: io_uring_prep_readv(sqe, fd, r.data.data(), n, r.offset()); break;
    case BlkOp::write: io_uring_prep_writev(sqe, fd, r.data.data(), n, r.offset()); break;
    case BlkOp::flush:
      io_uring_prep_fsync(sqe, b.fd, IORING_FSYNC_DATASYNC);
      // Starts only after every request submitted before it on this ring has completed, so
      // the flush covers every write the driver saw completed (5.2.6.3).
      sqe->flags |= IOSQE_IO_DRAIN;
      break;
    case BlkOp::discard:
      io_uring_prep_fallocate(sqe, b.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.offset(),
                              r.length);
      break;
    case BlkOp::write_zeroes: {
      const bool punch = r.unmap || b.zero_range_unsupported.load(std::memory_order_relaxed);
      const int mode = (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
      io_uring_prep_fallocate(sqe, b.fd, mode, r.offset(), r.length);
      break;
    }
    case BlkOp::get_id: return false;  // answered by submit, never queued
  }
  io_uring_sqe_set_data64(sqe, slot_index | kIoCqe);
  s.cqes_left = 1;
  if (b.delayed) {
    // The timer starts when the I/O has completed; a failed (or short) I/O cancels it.
    sqe->flags |= IOSQE_IO_LINK;
    io_uring_sqe* timer = io_uring_get_sqe(&ring);
    io_uring_prep_timeout(timer, &backing->latency, 0, 0);  // the kernel only reads it
    io_uring_sqe_set_data64(timer, slot_index);
    s.cqes_left = 2;
  }
  return true;
}

int BlkDevice::QueueState::run_inline(const Slot& s) noexcept {
  const Backing& b = *backing;
  const BlkRequest& r = s.req;
  const int fd = s.on_buffered ? b.buffered_fd : b.fd;
  const auto n = static_cast<int>(r.data.size());
  const auto offset = static_cast<off_t>(r.offset());
  for (;;) {
    long res = 0;
    switch (r.op) {
      case BlkOp::read: res = ::preadv(fd, r.data.data(), n, offset); break;
      case BlkOp::write: res = ::pwritev(fd, r.data.data(), n, offset); break;
      case BlkOp::flush:
        // Every earlier request on this queue has already been answered: nothing to order.
        res = ::fdatasync(b.fd);
        break;
      case BlkOp::discard:
      case BlkOp::write_zeroes: {
        const bool punch = r.op == BlkOp::discard || r.unmap ||
                           b.zero_range_unsupported.load(std::memory_order_relaxed);
        const int mode =
            (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
        res = ::fallocate(b.fd, mode, offset, static_cast<off_t>(r.length));
        break;
      }
      case BlkOp::get_id: return -EINVAL;  // answered by submit, never run
    }
    if (res >= 0) return static_cast<int>(res);  // at most kMaxTransfer bytes
    if (errno != EINTR) return -errno;
  }
}

bool BlkDevice::QueueState::second_chance(Slot& s, int res) noexcept {
  Backing& b = *backing;
  BlkRequest& r = s.req;
  if (res == -EINVAL && (r.op == BlkOp::read || r.op == BlkOp::write) && !s.on_buffered &&
      b.direct) {
    s.on_buffered = true;
    return true;
  }
  if (res == -EOPNOTSUPP && r.op == BlkOp::write_zeroes && !r.unmap) {
    if (!b.zero_range_unsupported.exchange(true, std::memory_order_relaxed)) {
      spdlog::info("blk: the image's file system has no ZERO_RANGE; WRITE_ZEROES punches holes");
    }
    r.unmap = true;
    return true;
  }
  return false;
}

void BlkDevice::QueueState::complete(vhost::Queue& q, std::uint32_t slot_index, int res) noexcept {
  Slot& s = slots[slot_index];
  // A second chance is resubmitted from the same slot.
  if (second_chance(s, res) && prep(s, slot_index)) {
    ++inflight;
    return;
  }
  free_slots.push_back(slot_index);
  answer(q, s, res);
}

void BlkDevice::QueueState::answer(vhost::Queue& q, Slot& s, int res) noexcept {
  const Backing& b = *backing;
  const BlkOp op = s.req.op;
  const bool data_op = op == BlkOp::read || op == BlkOp::write;
  // Bytes moved to or from the guest (at most kMaxTransfer).
  const auto moved = data_op ? static_cast<std::uint32_t>(s.req.length) : 0u;
  // A short transfer (the image shrank under us) is an error, not a partial success.
  const bool ok = data_op ? res >= 0 && static_cast<std::uint32_t>(res) == moved : res >= 0;
  if (!ok) {
    counters.io_errors.add();
    finish(q, s, virtio::kBlkSIoErr, 1);
    return;
  }
  if (s.on_buffered && b.direct && data_op) counters.buffered.add();
  std::uint32_t used = 1;
  switch (op) {
    case BlkOp::read:
      counters.reads.add();
      counters.bytes_read.add(moved);
      used = moved + 1;
      break;
    case BlkOp::write:
      counters.writes.add();
      counters.bytes_written.add(moved);
      break;
    case BlkOp::flush: counters.flushes.add(); break;
    case BlkOp::discard:
    case BlkOp::write_zeroes: counters.discards.add(); break;
    case BlkOp::get_id: break;  // answered by submit
  }
  q.stats().add(q.stats().bytes, moved);
  finish(q, s, virtio::kBlkSOk, used);
}

}  // namespace vhostkit::blk
