// The virtio-blk driver's control path: options, connect, config space.
#include "vhostkit/driver/blk_driver.h"

#include <fmt/format.h>

#include <bit>
#include <utility>

namespace vhostkit::driver {
namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

template <typename T>
T load(std::span<const std::uint8_t> c, std::size_t off) {
  T v;
  std::memcpy(&v, c.data() + off, sizeof v);
  return v;
}

}  // namespace

// A slot: data, then header and status, rounded up to a page so every slot's data is aligned.
std::uint32_t BlkDriver::slot_bytes(std::uint32_t max_data) noexcept {
  return static_cast<std::uint32_t>(
      align_up(std::size_t{max_data} + sizeof(virtio::VirtioBlkOutHdr) + 1, kPage));
}

Result<vhost_user::FrontendOptions> BlkDriverOptions::session_options() && {
  if (num_queues == 0 || num_queues > BlkDriver::kMaxQueues) {
    return fail(Errc::out_of_range,
                fmt::format("num_queues {} not in 1..{}", num_queues, BlkDriver::kMaxQueues));
  }
  if (depth == 0 || depth > BlkDriver::kMaxDepth) {
    return fail(Errc::out_of_range,
                fmt::format("depth {} not in 1..{}", depth, BlkDriver::kMaxDepth));
  }
  if (max_data < virtio::kBlkSectorSize || max_data > BlkDriver::kMaxData ||
      max_data % virtio::kBlkSectorSize != 0) {
    return fail(Errc::out_of_range, fmt::format("max_data {} is not a multiple of 512 in 512..{}",
                                                max_data, BlkDriver::kMaxData));
  }
  // Three descriptors per request.
  const std::uint32_t need = 3u * depth;
  std::uint32_t size = queue_size;
  if (size == 0) size = std::max<std::uint32_t>(64, std::bit_ceil(need));
  if (size > virtio::kMaxQueueSize) {
    return fail(Errc::out_of_range,
                fmt::format("depth {} needs a ring of {} descriptors, more than {}", depth, need,
                            virtio::kMaxQueueSize));
  }
  if (size < need) {
    return fail(Errc::out_of_range, fmt::format("a ring of {} holds {} three-descriptor requests, "
                                                "{} wanted in flight",
                                                size, size / 3, depth));
  }
  vhost_user::FrontendOptions o;
  o.socket_path = std::move(socket_path);
  o.channel = std::move(channel);
  o.rings = num_queues;
  o.queue_size = static_cast<std::uint16_t>(size);
  o.ring_area_bytes = std::size_t{depth} * BlkDriver::slot_bytes(max_data);
  o.memory_size = 0;
  o.features =
      features.value_or(kBlkFeatures | (num_queues > 1 ? virtio::bit(virtio::blk_feature::mq) : 0));
  if (ring == vhost_user::RingLayout::packed)
    o.features |= virtio::bit(virtio::feature::ring_packed);
  if (in_order) o.features |= virtio::bit(virtio::feature::in_order);
  o.drivable = kBlkDrivableFeatures;
  o.queues = {.count = num_queues,
              .mq_feature = virtio::blk_feature::mq,
              .mq_name = "VIRTIO_BLK_F_MQ",
              .unit = "queues"};
  o.notify = notify;
  o.timeout = timeout;
  o.name = std::move(name);
  if (auto v = o.validate(); !v) return std::unexpected(std::move(v.error()));
  return o;
}

Result<BlkInfo> BlkDriver::parse_config(std::span<const std::uint8_t> c, std::uint64_t features) {
  using virtio::VirtioBlkConfig;
  namespace bf = virtio::blk_feature;
  if (c.size() < kConfigBytes) {
    return fail(Errc::invalid_argument,
                fmt::format("config of {} bytes, {} needed", c.size(), kConfigBytes));
  }
  BlkInfo info;
  info.capacity = load<std::uint64_t>(c, offsetof(VirtioBlkConfig, capacity));
  if (info.capacity == 0) return fail(Errc::broken, "config: capacity is 0 sectors");
  // A byte size that overflows 64 bits is no disk we can address.
  if (info.capacity > (std::uint64_t{1} << 54)) {
    return fail(Errc::broken,
                fmt::format("config: capacity {} sectors is beyond 2^63 bytes", info.capacity));
  }
  if (virtio::has(features, bf::blk_size)) {
    info.blk_size = load<std::uint32_t>(c, offsetof(VirtioBlkConfig, blk_size));
    if (info.blk_size < 512 || info.blk_size > 65536 || !std::has_single_bit(info.blk_size)) {
      return fail(Errc::broken, fmt::format("config: blk_size {} is not a power of two in "
                                            "512..65536",
                                            info.blk_size));
    }
  }
  if (virtio::has(features, bf::seg_max)) {
    info.seg_max = load<std::uint32_t>(c, offsetof(VirtioBlkConfig, seg_max));
  }
  // A limit of 0 states none: qemu-storage-daemon 7.2 offers SIZE_MAX and SEG_MAX with
  // size_max 0 in every configuration, and Linux's block layer reads 0 as "no limit" too. A
  // limit of 1..511 bytes is one no request can meet.
  if (virtio::has(features, bf::size_max)) {
    info.size_max = load<std::uint32_t>(c, offsetof(VirtioBlkConfig, size_max));
    if (info.size_max != 0 && info.size_max < 512) {
      return fail(Errc::broken,
                  fmt::format("config: size_max {} is less than a sector", info.size_max));
    }
  }
  if (virtio::has(features, bf::mq)) {
    info.num_queues = load<std::uint16_t>(c, offsetof(VirtioBlkConfig, num_queues));
    if (info.num_queues == 0) return fail(Errc::broken, "config: num_queues is 0");
  }
  info.read_only = virtio::has(features, bf::ro);
  info.flush = virtio::has(features, bf::flush);
  return info;
}

Result<std::unique_ptr<BlkDriver>> BlkDriver::connect(BlkDriverOptions opts) {
  const std::uint16_t depth = opts.depth;
  const std::uint32_t max_data = opts.max_data;
  const std::uint16_t queues = opts.num_queues;
  auto so = std::move(opts).session_options();
  if (!so) return std::unexpected(std::move(so.error()));
  auto s = vhost_user::FrontendSession::connect(std::move(*so));
  if (!s) return std::unexpected(std::move(s.error()));
  std::unique_ptr<BlkDriver> f(new BlkDriver());
  f->session_ = std::move(*s);
  f->depth_ = depth;
  f->max_data_ = max_data;
  // Every ring is a request queue whose slots all start free; nothing is posted before a
  // request is submitted.
  f->queues_.resize(queues);
  for (std::uint16_t q = 0; q < queues; ++q) {
    Queue& r = f->queues_[q];
    r.init(f->session_->ring(q), slot_bytes(max_data), depth, kBurst);
    for (std::uint16_t b = depth; b-- > 0;) r.free[r.free_top++] = b;
  }
  if (auto r = f->session_->start_rings(); !r) return std::unexpected(std::move(r.error()));
  // Without CONFIG there is no capacity to stay within: a driver can't use such a disk.
  auto raw = f->session_->get_config(0, kConfigBytes);
  if (!raw) return std::unexpected(std::move(raw.error()));
  auto info = parse_config(*raw, f->session_->features());
  if (!info) {
    return fail(info.error().code, fmt::format("GET_CONFIG: {}", info.error().detail));
  }
  if (info->num_queues < queues) {
    return fail(Errc::unsupported, fmt::format("config: the device has {} request queues, {} "
                                               "wanted",
                                               info->num_queues, queues));
  }
  // Each request's data is one segment.
  if (info->size_max != 0 && max_data > info->size_max) {
    return fail(Errc::unsupported, fmt::format("config: the device takes data segments of at most "
                                               "{} bytes (size_max), {} wanted",
                                               info->size_max, max_data));
  }
  f->info_ = *info;
  return f;
}

Result<std::vector<std::uint32_t>> BlkDriver::stop() {
  stopped_ = true;
  return session_->stop();
}

}  // namespace vhostkit::driver
