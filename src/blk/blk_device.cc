// BlkDevice: opening the backing store, features, config space, and the per-queue plumbing.
// The request path is in blk_io.cc.
#include "vhostkit/blk/blk_device.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "blk_queue.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"

namespace vhostkit::blk {

namespace {

using virtio::bit;
namespace bf = virtio::blk_feature;

std::string default_serial(const std::string& path) {
  const auto slash = path.find_last_of('/');
  std::string s = "vhostkit-" + (slash == std::string::npos ? path : path.substr(slash + 1));
  if (s.size() > virtio::kBlkIdBytes) s.resize(virtio::kBlkIdBytes);
  return s;
}

// File systems whose reads and writes are copies to and from the page cache, never a device wait.
bool on_memory_fs(int fd) {
  struct statfs fs{};
  if (::fstatfs(fd, &fs) != 0) return false;
  const auto t = static_cast<unsigned long>(fs.f_type);
  return t == TMPFS_MAGIC || t == RAMFS_MAGIC || t == HUGETLBFS_MAGIC;
}

}  // namespace

const char* to_string(IoPath p) noexcept {
  switch (p) {
    case IoPath::automatic: return "auto";
    case IoPath::uring: return "uring";
    case IoPath::inline_call: return "inline";
  }
  return "?";
}

BlkDevice::BlkDevice(BlkOptions opts) : opts_(std::move(opts)) {}

BlkDevice::~BlkDevice() = default;

Result<std::unique_ptr<BlkDevice>> BlkDevice::open(BlkOptions opts) {
  if (opts.image.empty()) return fail(Errc::invalid_argument, "no image given");
  if (opts.num_queues < 1 || opts.num_queues > kMaxQueues) {
    return fail(Errc::out_of_range, fmt::format("queues must be 1..{}", kMaxQueues));
  }
  if (opts.blk_size != 512 && opts.blk_size != 4096) {
    return fail(Errc::invalid_argument, "block size must be 512 or 4096");
  }
  if (opts.serial.size() > virtio::kBlkIdBytes) {
    return fail(Errc::invalid_argument, "serial is longer than 20 bytes");
  }
  if (opts.added_latency.count() < 0 || opts.added_latency > kMaxAddedLatency) {
    return fail(Errc::out_of_range,
                fmt::format("added latency must be 0..{} us", kMaxAddedLatency.count()));
  }
  if (opts.added_latency.count() > 0 && opts.io == IoPath::inline_call) {
    return fail(Errc::invalid_argument,
                "added latency needs the io_uring path (inline I/O answers at once)");
  }
  std::unique_ptr<BlkDevice> d(new BlkDevice(std::move(opts)));
  const BlkOptions& o = d->opts_;
  const int mode = (o.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;

  // Buffered first: it tells us whether the image exists at all, with the plain error.
  UniqueFd buffered(::open(o.image.c_str(), mode));
  if (!buffered) return fail_errno(fmt::format("cannot open image {}", o.image));
  struct stat st{};
  if (::fstat(buffered.get(), &st) != 0) return fail_errno("cannot stat image " + o.image);
  std::uint64_t bytes = 0;
  std::uint32_t dio_align = 512;
  bool block_device = false;
  if (S_ISBLK(st.st_mode)) {
    block_device = true;
    if (::ioctl(buffered.get(), BLKGETSIZE64, &bytes) != 0) {
      return fail_errno("cannot get the size of block device " + o.image);
    }
    int lbs = 0;
    if (::ioctl(buffered.get(), BLKSSZGET, &lbs) == 0 && lbs >= 512) {
      dio_align = static_cast<std::uint32_t>(lbs);
    }
  } else if (S_ISREG(st.st_mode)) {
    bytes = static_cast<std::uint64_t>(st.st_size);
  } else {
    return fail(Errc::invalid_argument, o.image + " is not a regular file or block device");
  }
  if (bytes == 0 || bytes % virtio::kBlkSectorSize != 0) {
    return fail(
        Errc::invalid_argument,
        fmt::format("image {} is {} bytes, not a positive multiple of 512", o.image, bytes));
  }

  // O_DIRECT where the file system takes it (tmpfs on older kernels refuses it at open).
  UniqueFd direct;
  if (o.try_direct) direct = UniqueFd(::open(o.image.c_str(), mode | O_DIRECT));
  d->direct_ = direct.valid();
  if (d->direct_) {
    d->fd_ = std::move(direct);
    d->buffered_fd_ = std::move(buffered);
  } else {
    d->fd_ = std::move(buffered);
  }
  d->memory_backed_ = !block_device && on_memory_fs(d->fd_.get());
  d->io_ = o.io != IoPath::automatic                           ? o.io
           : d->memory_backed_ && o.added_latency.count() == 0 ? IoPath::inline_call
                                                               : IoPath::uring;
  d->capacity_ = bytes / virtio::kBlkSectorSize;
  d->serial_ = o.serial.empty() ? default_serial(o.image) : o.serial;

  d->offered_ = bit(virtio::feature::version_1) | bit(virtio::feature::ring_event_idx) |
                bit(virtio::feature::ring_indirect_desc) | bit(bf::seg_max) | bit(bf::blk_size) |
                bit(bf::flush) | bit(bf::mq) | bit(bf::discard) | bit(bf::write_zeroes) |
                bit(bf::size_max);
  if (o.read_only) d->offered_ |= bit(bf::ro);
  if (o.packed) d->offered_ |= bit(virtio::feature::ring_packed);
  if (o.in_order && d->io_ == IoPath::inline_call) d->offered_ |= bit(virtio::feature::in_order);

  d->backing_ = std::make_unique<Backing>();
  Backing& b = *d->backing_;
  b.fd = d->fd_.get();
  b.buffered_fd = d->direct_ ? d->buffered_fd_.get() : d->fd_.get();
  b.direct = d->direct_;
  b.block_device = block_device;
  b.dio_align = dio_align;
  b.limits.capacity = d->capacity_;
  b.limits.read_only = o.read_only;
  b.limits.max_transfer = kMaxTransfer;
  b.limits.max_discard_sectors = kMaxDiscardSectors;
  b.inline_io = d->io_ == IoPath::inline_call;
  if (o.added_latency.count() > 0) {
    b.delayed = true;
    b.latency.tv_sec = o.added_latency.count() / 1'000'000;
    b.latency.tv_nsec = o.added_latency.count() % 1'000'000 * 1000;
  }
  b.serial = &d->serial_;
  d->queues_ = std::make_unique<QueueState[]>(o.num_queues);
  for (std::uint16_t i = 0; i < o.num_queues; ++i) d->queues_[i].backing = &b;
  spdlog::debug("blk: image {} ({} sectors, {}, {}{}{})", o.image, d->capacity_,
                d->direct_ ? "O_DIRECT" : "buffered", to_string(d->io_),
                d->memory_backed_ ? ", memory file system" : "", o.read_only ? ", read-only" : "");
  return d;
}

std::uint64_t BlkDevice::features() const noexcept { return offered_; }

std::uint16_t BlkDevice::num_queues() const noexcept { return opts_.num_queues; }

Result<> BlkDevice::read_config(std::uint32_t offset, std::span<std::uint8_t> out) const {
  virtio::VirtioBlkConfig c{};
  c.capacity = capacity_;
  c.seg_max = kSegMax;
  c.size_max = kMaxTransfer;
  c.blk_size = opts_.blk_size;
  c.num_queues = opts_.num_queues;
  const std::uint32_t sectors_per_block = opts_.blk_size / virtio::kBlkSectorSize;
  c.max_discard_sectors = kMaxDiscardSectors;
  c.max_discard_seg = 1;
  c.discard_sector_alignment = sectors_per_block;
  c.max_write_zeroes_sectors = kMaxDiscardSectors;
  c.max_write_zeroes_seg = 1;
  c.write_zeroes_may_unmap = 1;
  // Frontends read the size of their own idea of the struct, which may be longer than ours:
  // bytes past the end read as zero. Only an offset past the end is refused.
  if (offset > sizeof c) {
    return fail(Errc::out_of_range,
                fmt::format("config offset {} is past the {}-byte config", offset, sizeof c));
  }
  std::fill(out.begin(), out.end(), std::uint8_t{0});
  const std::size_t n = std::min<std::size_t>(out.size(), sizeof c - offset);
  std::memcpy(out.data(), reinterpret_cast<const std::uint8_t*>(&c) + offset, n);
  return {};
}

void BlkDevice::set_features(std::uint64_t acked) noexcept {
  backing_->limits.discard = virtio::has(acked, bf::discard);
  backing_->limits.write_zeroes = virtio::has(acked, bf::write_zeroes);
}

void BlkDevice::queue_started(vhost::Queue& q, vhost::Worker& w) {
  if (q.index() >= opts_.num_queues) return;
  queues_[q.index()].start(q, w);
}

void BlkDevice::queue_stopped(vhost::Queue& q, vhost::Worker& w) {
  if (q.index() >= opts_.num_queues) return;
  queues_[q.index()].stop(q, w);
}

void BlkDevice::quiesce(vhost::Queue& q, vhost::Worker& w) {
  (void)w;
  if (q.index() >= opts_.num_queues) return;
  queues_[q.index()].drain(q);
}

bool BlkDevice::handle_queue(vhost::Queue& q) noexcept {
  if (q.index() >= opts_.num_queues) [[unlikely]]
    return false;
  QueueState& s = queues_[q.index()];
  unsigned work = s.reap(q);
  work += s.pop_and_submit(q);
  if (work != 0) {
    q.publish_and_notify();
    return true;
  }
  // Waiting on io_uring with nothing else to do: waiting_on_io says so, and a spinning worker
  // yields its core (see Worker::Poller::io_wait).
  return false;
}

bool BlkDevice::waiting_on_io(const vhost::Queue& q) const noexcept {
  if (q.index() >= opts_.num_queues) return false;
  const QueueState& s = queues_[q.index()];
  return s.ring_ok && s.inflight != 0;
}

BlkStats BlkDevice::stats(std::uint16_t queue) const noexcept {
  BlkStats st;
  if (queue >= opts_.num_queues) return st;
  const Counters& c = queues_[queue].counters;
  st.reads = c.reads.load();
  st.writes = c.writes.load();
  st.flushes = c.flushes.load();
  st.discards = c.discards.load();
  st.get_ids = c.get_ids.load();
  st.bytes_read = c.bytes_read.load();
  st.bytes_written = c.bytes_written.load();
  st.io_errors = c.io_errors.load();
  st.bad_requests = c.bad_requests.load();
  st.no_status = c.no_status.load();
  st.buffered = c.buffered.load();
  return st;
}

std::uint32_t BlkDevice::inflight(std::uint16_t queue) const noexcept {
  if (queue >= opts_.num_queues) return 0;
  return queues_[queue].counters.inflight.load(std::memory_order_relaxed);
}

}  // namespace vhostkit::blk
