// The virtio-blk request path: validate a popped chain (virtio 1.2, 5.2.6), then either submit
// it to the queue's io_uring and answer it when its completion arrives (in any order), or, on the
// inline path (an image in memory, see IoPath), run its system call on the worker and answer it
// at once.
//
// A chain is: the 16-byte header in the first readable bytes (possibly split over descriptors),
// then data (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then one status byte,
// the last writable byte. Everything in it is hostile: a chain with no writable byte gets used
// len 0 and a counter; any other bad request gets VIRTIO_BLK_S_IOERR (UNSUPP for unknown types).
#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "blk_queue.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"

namespace vhostkit::blk {

namespace {

namespace bf = virtio::blk_feature;
using virtio::kBlkSectorSize;

// Chains popped per handle_queue call: one submit per batch.
constexpr unsigned kBatch = 32;

// Copies the first out.size() bytes of `v` into out (guest memory read once). False if short.
bool gather(std::span<const iovec> v, std::uint8_t* out, std::size_t len, std::size_t skip = 0) {
  for (const iovec& seg : v) {
    if (len == 0) break;
    std::size_t n = seg.iov_len;
    const auto* p = static_cast<const std::uint8_t*>(seg.iov_base);
    if (skip >= n) {
      skip -= n;
      continue;
    }
    p += skip;
    n -= skip;
    skip = 0;
    n = std::min(n, len);
    std::memcpy(out, p, n);
    out += n;
    len -= n;
  }
  return len == 0;
}

// Drops the first `skip` bytes of v[0..n) in place; returns the index of the first byte left.
unsigned trim_front(iovec* v, unsigned n, std::size_t skip) {
  unsigned i = 0;
  while (i < n && skip >= v[i].iov_len) {
    skip -= v[i].iov_len;
    ++i;
  }
  if (i < n && skip > 0) {
    v[i].iov_base = static_cast<std::uint8_t*>(v[i].iov_base) + skip;
    v[i].iov_len -= skip;
  }
  return i;
}

// The sector range [sector, sector + bytes/512) lies within the capacity (no wrap-around).
bool in_range(std::uint64_t sector, std::uint64_t bytes, std::uint64_t capacity) {
  return sector <= capacity && bytes / kBlkSectorSize <= capacity - sector;
}

bool aligned(const iovec* v, unsigned n, std::uint32_t align) {
  for (unsigned i = 0; i < n; ++i) {
    if ((reinterpret_cast<std::uintptr_t>(v[i].iov_base) | v[i].iov_len) & (align - 1)) {
      return false;
    }
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
  counters.inflight.store(0, std::memory_order_relaxed);
  ring_ok = false;
  if (backing->inline_io) return;  // requests are answered by plain calls on the worker
  if (int r = io_uring_queue_init(BlkDevice::kMaxInflight, &ring, 0); r < 0) {
    spdlog::error("blk: vring {}: io_uring setup failed ({}); requests get IOERR", q.index(),
                  std::strerror(-r));
    return;
  }
  cq_event = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!cq_event || io_uring_register_eventfd(&ring, cq_event.get()) < 0) {
    spdlog::error("blk: vring {}: no completion eventfd; requests get IOERR", q.index());
    io_uring_queue_exit(&ring);
    cq_event.reset();
    return;
  }
  auto id = w.watch(cq_event.get(), [this, &q] { on_completion(q); });
  if (!id) {
    spdlog::error("blk: vring {}: cannot watch completions ({}); requests get IOERR", q.index(),
                  id.error().message());
    io_uring_queue_exit(&ring);
    cq_event.reset();
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
  if (!ring_ok) return;
  drain(q);
  if (watch_id != 0) w.unwatch(std::exchange(watch_id, 0));
  // Exiting the ring also cancels and waits for anything left (the error case above).
  io_uring_queue_exit(&ring);
  cq_event.reset();
  ring_ok = false;
}

void BlkDevice::QueueState::on_completion(vhost::Queue& q) noexcept {
  std::uint64_t v = 0;
  [[maybe_unused]] auto r = ::read(cq_event.get(), &v, sizeof v);
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
      const auto idx = static_cast<std::uint32_t>(io_uring_cqe_get_data64(cqes[i]));
      const int res = cqes[i]->res;
      io_uring_cqe_seen(&ring, cqes[i]);
      if (idx >= BlkDevice::kMaxInflight) continue;  // not ours (never happens)
      --inflight;
      complete(q, idx, res);
    }
    total += n;
  }
  counters.inflight.store(inflight, std::memory_order_relaxed);
  // A retried request (see complete) was prepared but not yet submitted.
  if (io_uring_sq_ready(&ring) != 0) io_uring_submit(&ring);
  return total;
}

unsigned BlkDevice::QueueState::pop_and_submit(vhost::Queue& q) noexcept {
  virtq::DeviceQueue& vq = q.vq();
  unsigned popped = 0;
  unsigned prepared = 0;
  while (popped < kBatch && !free_slots.empty() && vq.pending() > 0) {
    const std::uint32_t idx = free_slots.back();
    Slot& s = slots[idx];
    auto chain = vq.pop(std::span<iovec>(s.segs, Slot::kSegs));
    ++popped;
    if (!chain) {
      // Answered by the queue (used len 0) and counted there; a broken ring stops here.
      if (virtq::breaks_queue(chain.error())) break;
      continue;
    }
    q.stats().add(q.stats().chains);
    s.head = chain->head;
    // The chain's pieces are s.segs[0..r) readable then s.segs[r..r+w) writable.
    const auto r = static_cast<unsigned>(chain->readable.size());
    const auto wn = static_cast<unsigned>(chain->writable.size());
    if (dispatch(q, s, idx, chain->readable_len, chain->writable_len, r, wn)) {
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

void BlkDevice::QueueState::finish(vhost::Queue& q, Slot& s, std::uint8_t status,
                                   std::uint32_t used_len) noexcept {
  // The status byte goes last, after the data the request moved; the used element after it.
  *s.status = status;
  q.vq().push_used(s.head, used_len);
}

bool BlkDevice::QueueState::dispatch(vhost::Queue& q, Slot& s, std::uint32_t slot_index,
                                     std::uint64_t readable_len, std::uint64_t writable_len,
                                     unsigned nr, unsigned nw) noexcept {
  const Backing& b = *backing;
  if (writable_len == 0) {
    // Nowhere to say what went wrong (no status byte, or it sits in a readable buffer).
    q.vq().push_used(s.head, 0);
    Counters::add(counters.no_status);
    return false;
  }
  iovec& last = s.segs[nr + nw - 1];
  s.status = static_cast<std::uint8_t*>(last.iov_base) + last.iov_len - 1;
  auto bad = [&](std::uint8_t status = virtio::kBlkSIoErr) {
    Counters::add(counters.bad_requests);
    finish(q, s, status, 1);
    return false;
  };
  virtio::VirtioBlkOutHdr hdr{};
  if (!gather(std::span<const iovec>(s.segs, nr), reinterpret_cast<std::uint8_t*>(&hdr),
              sizeof hdr)) {
    return bad();
  }
  const std::uint64_t out_data = readable_len - sizeof hdr;  // readable bytes after the header
  const std::uint64_t in_data = writable_len - 1;            // writable bytes before the status

  switch (hdr.type) {
    case virtio::blk_type::in: {
      if (out_data != 0 || in_data % kBlkSectorSize != 0 || in_data > kMaxTransfer ||
          !in_range(hdr.sector, in_data, b.capacity)) {
        return bad();
      }
      // Data is every writable piece but the status byte.
      s.data = s.segs + nr;
      s.ndata = nw;
      if (--last.iov_len == 0) --s.ndata;
      s.op = Op::read;
      break;
    }
    case virtio::blk_type::out: {
      if (in_data != 0 || out_data % kBlkSectorSize != 0 || out_data > kMaxTransfer ||
          !in_range(hdr.sector, out_data, b.capacity)) {
        return bad();
      }
      if (b.read_only) return bad();
      const unsigned first = trim_front(s.segs, nr, sizeof hdr);
      s.data = s.segs + first;
      s.ndata = nr - first;
      s.op = Op::write;
      break;
    }
    case virtio::blk_type::flush:
      s.op = Op::flush;
      s.ndata = 0;
      s.data_len = 0;
      break;
    case virtio::blk_type::get_id: {
      // Up to 20 bytes of serial, zero-padded (no terminator when it fills all 20).
      std::uint8_t id[virtio::kBlkIdBytes]{};
      std::memcpy(id, b.serial->data(), std::min(b.serial->size(), sizeof id));
      const std::size_t n = std::min<std::uint64_t>(in_data, sizeof id);
      std::size_t done = 0;
      for (unsigned i = nr; i < nr + nw && done < n; ++i) {
        const std::size_t k = std::min(n - done, s.segs[i].iov_len);
        std::memcpy(s.segs[i].iov_base, id + done, k);
        done += k;
      }
      Counters::add(counters.get_ids);
      finish(q, s, virtio::kBlkSOk, static_cast<std::uint32_t>(n + 1));
      return false;
    }
    case virtio::blk_type::discard:
    case virtio::blk_type::write_zeroes: {
      const bool zeroes = hdr.type == virtio::blk_type::write_zeroes;
      if (!virtio::has(b.acked, zeroes ? bf::write_zeroes : bf::discard)) {
        return bad(virtio::kBlkSUnsupp);
      }
      // One segment (max_discard_seg = max_write_zeroes_seg = 1).
      virtio::VirtioBlkDiscardWriteZeroes seg{};
      if (in_data != 0 || out_data != sizeof seg ||
          !gather(std::span<const iovec>(s.segs, nr), reinterpret_cast<std::uint8_t*>(&seg),
                  sizeof seg, sizeof hdr)) {
        return bad();
      }
      // Discard with the unmap flag, or any flag but unmap, is not ours to honour (5.2.6.2).
      if (zeroes ? (seg.flags & ~virtio::kBlkWriteZeroesFUnmap) != 0 : seg.flags != 0) {
        return bad(virtio::kBlkSUnsupp);
      }
      const std::uint64_t bytes = std::uint64_t{seg.num_sectors} * kBlkSectorSize;
      if (seg.num_sectors == 0 || seg.num_sectors > BlkDevice::kMaxDiscardSectors ||
          !in_range(seg.sector, bytes, b.capacity)) {
        return bad();
      }
      if (b.read_only) return bad();
      s.op = zeroes ? Op::write_zeroes : Op::discard;
      s.offset = seg.sector * kBlkSectorSize;
      s.length = bytes;
      s.unmap = (seg.flags & virtio::kBlkWriteZeroesFUnmap) != 0;
      s.ndata = 0;
      s.data_len = 0;
      break;
    }
    default: return bad(virtio::kBlkSUnsupp);
  }
  if (s.op == Op::read || s.op == Op::write) {
    s.offset = hdr.sector * kBlkSectorSize;
    s.data_len = static_cast<std::uint32_t>(s.op == Op::read ? in_data : out_data);
    if (s.data_len == 0) {
      finish(q, s, virtio::kBlkSOk, 1);
      return false;
    }
    // O_DIRECT takes only aligned buffers and offsets; anything else goes the buffered way.
    s.on_buffered =
        !b.direct || s.offset % b.dio_align != 0 || !aligned(s.data, s.ndata, b.dio_align);
  }
  if (b.inline_io) {
    int res = run_inline(s);
    while (second_chance(s, res)) res = run_inline(s);
    answer(q, s, res);
    return false;
  }
  if (!ring_ok) {
    Counters::add(counters.io_errors);
    finish(q, s, virtio::kBlkSIoErr, 1);
    return false;
  }
  if (!prep(s, slot_index)) {
    Counters::add(counters.io_errors);
    finish(q, s, virtio::kBlkSIoErr, 1);
    return false;
  }
  return true;
}

bool BlkDevice::QueueState::prep(Slot& s, std::uint32_t slot_index) noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (sqe == nullptr) return false;  // cannot happen: slots never outnumber SQ entries
  const Backing& b = *backing;
  const int fd = s.on_buffered ? b.buffered_fd : b.fd;
  switch (s.op) {
    case Op::read: io_uring_prep_readv(sqe, fd, s.data, s.ndata, s.offset); break;
    case Op::write: io_uring_prep_writev(sqe, fd, s.data, s.ndata, s.offset); break;
    case Op::flush:
      io_uring_prep_fsync(sqe, b.fd, IORING_FSYNC_DATASYNC);
      // Starts only after every request submitted before it on this ring has completed, so
      // the flush covers every write the driver saw completed (5.2.6.3).
      sqe->flags |= IOSQE_IO_DRAIN;
      break;
    case Op::discard:
      io_uring_prep_fallocate(sqe, b.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, s.offset,
                              s.length);
      break;
    case Op::write_zeroes: {
      const bool punch = s.unmap || b.zero_range_unsupported.load(std::memory_order_relaxed);
      const int mode = (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
      io_uring_prep_fallocate(sqe, b.fd, mode, s.offset, s.length);
      break;
    }
  }
  io_uring_sqe_set_data64(sqe, slot_index);
  return true;
}

int BlkDevice::QueueState::run_inline(const Slot& s) noexcept {
  const Backing& b = *backing;
  const int fd = s.on_buffered ? b.buffered_fd : b.fd;
  for (;;) {
    long r = 0;
    switch (s.op) {
      case Op::read:
        r = ::preadv(fd, s.data, static_cast<int>(s.ndata), static_cast<off_t>(s.offset));
        break;
      case Op::write:
        r = ::pwritev(fd, s.data, static_cast<int>(s.ndata), static_cast<off_t>(s.offset));
        break;
      case Op::flush:
        // Every earlier request on this queue has already been answered: nothing to order.
        r = ::fdatasync(b.fd);
        break;
      case Op::discard:
      case Op::write_zeroes: {
        const bool punch = s.op == Op::discard || s.unmap ||
                           b.zero_range_unsupported.load(std::memory_order_relaxed);
        const int mode =
            (punch ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
        r = ::fallocate(b.fd, mode, static_cast<off_t>(s.offset), static_cast<off_t>(s.length));
        break;
      }
    }
    if (r >= 0) return static_cast<int>(r);  // at most kMaxTransfer bytes
    if (errno != EINTR) return -errno;
  }
}

bool BlkDevice::QueueState::second_chance(Slot& s, int res) noexcept {
  Backing& b = *backing;
  if (res == -EINVAL && (s.op == Op::read || s.op == Op::write) && !s.on_buffered && b.direct) {
    s.on_buffered = true;
    return true;
  }
  if (res == -EOPNOTSUPP && s.op == Op::write_zeroes && !s.unmap) {
    if (!b.zero_range_unsupported.exchange(true, std::memory_order_relaxed)) {
      spdlog::info("blk: the image's file system has no ZERO_RANGE; WRITE_ZEROES punches holes");
    }
    s.unmap = true;
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
  const bool data_op = s.op == Op::read || s.op == Op::write;
  // A short transfer (the image shrank under us) is an error, not a partial success.
  const bool ok = data_op ? res >= 0 && static_cast<std::uint32_t>(res) == s.data_len : res >= 0;
  if (!ok) {
    Counters::add(counters.io_errors);
    finish(q, s, virtio::kBlkSIoErr, 1);
    return;
  }
  if (s.on_buffered && b.direct && data_op) Counters::add(counters.buffered);
  std::uint32_t used = 1;
  switch (s.op) {
    case Op::read:
      Counters::add(counters.reads);
      Counters::add(counters.bytes_read, s.data_len);
      used = s.data_len + 1;
      break;
    case Op::write:
      Counters::add(counters.writes);
      Counters::add(counters.bytes_written, s.data_len);
      break;
    case Op::flush: Counters::add(counters.flushes); break;
    case Op::discard:
    case Op::write_zeroes: Counters::add(counters.discards); break;
  }
  q.stats().add(q.stats().bytes, s.data_len);
  finish(q, s, virtio::kBlkSOk, used);
}

}  // namespace vhostkit::blk
