// The virtio-net driver's control path (options, connect, config space) and the rarely taken
// pieces of its data path. The rest of the data path is inline in the header.
#include "vhostkit/driver/net_driver.h"

#include <fmt/format.h>

#include <algorithm>
#include <utility>

namespace vhostkit::driver {
namespace {

// The largest frame we gather from several mergeable rx buffers (a 64 KiB GSO frame).
constexpr std::size_t kMaxMergedFrame = 65536 + 14 + 4;

}  // namespace

Result<vhost_user::FrontendOptions> NetDriverOptions::session_options() && {
  if (queue_pairs == 0 || queue_pairs > NetDriver::kMaxQueuePairs) {
    return fail(Errc::out_of_range,
                fmt::format("queue pairs {} not in 1..{}", queue_pairs, NetDriver::kMaxQueuePairs));
  }
  const std::size_t max_buffer = kMaxMergedFrame + sizeof(virtio::VirtioNetHdrMrg);
  if (buffer_size < 64 || buffer_size > max_buffer) {
    return fail(Errc::out_of_range,
                fmt::format("buffer size {} not in {}..{}", buffer_size, 64, max_buffer));
  }
  vhost_user::FrontendOptions o;
  o.socket_path = std::move(socket_path);
  o.channel = std::move(channel);
  o.rings = static_cast<std::uint16_t>(2u * queue_pairs);
  o.queue_size = queue_size;
  // A buffer per descriptor: rx posts one per slot, tx can't have more chains in flight.
  o.ring_area_bytes = std::size_t{queue_size} * buffer_size;
  o.memory_size = memory_size;
  o.features = features.value_or(kNetFeatures |
                                 (queue_pairs > 1 ? virtio::bit(virtio::net_feature::mq) : 0));
  if (ring == vhost_user::RingLayout::packed)
    o.features |= virtio::bit(virtio::feature::ring_packed);
  if (in_order) o.features |= virtio::bit(virtio::feature::in_order);
  o.drivable = kNetDrivableFeatures;
  o.queues = {.count = queue_pairs,
              .mq_feature = virtio::net_feature::mq,
              .mq_name = "VIRTIO_NET_F_MQ",
              .unit = "queue pairs"};
  o.protocol_features = protocol_features;
  o.notify = notify;
  o.timeout = timeout;
  o.name = std::move(name);
  if (auto v = o.validate(); !v) return std::unexpected(std::move(v.error()));
  return o;
}

Result<std::unique_ptr<NetDriver>> NetDriver::connect(NetDriverOptions opts) {
  const std::uint16_t pairs = opts.queue_pairs;
  const std::uint32_t buffer_size = opts.buffer_size;
  const bool align = opts.align_rx_frames;
  auto so = std::move(opts).session_options();
  if (!so) return std::unexpected(std::move(so.error()));
  auto s = vhost_user::FrontendSession::connect(std::move(*so));
  if (!s) return std::unexpected(std::move(s.error()));
  std::unique_ptr<NetDriver> d(new NetDriver());
  d->session_ = std::move(*s);
  d->queue_pairs_ = pairs;
  if (auto r = d->setup(buffer_size, align); !r) return std::unexpected(std::move(r.error()));
  if (auto r = d->session_->start_rings(); !r) return std::unexpected(std::move(r.error()));
  // The rx rings are full of buffers the device has not been told about.
  for (std::uint16_t qp = 0; qp < pairs; ++qp) d->session_->kick(rx_index(qp));
  return d;
}

Result<> NetDriver::setup(std::uint32_t buffer_size, bool align_rx_frames) {
  const std::uint64_t f = session_->features();
  mrg_rxbuf_ = virtio::has(f, virtio::net_feature::mrg_rxbuf);
  hdr_len_ = virtio::net_hdr_size(virtio::has(f, virtio::feature::version_1), mrg_rxbuf_);
  buffer_size_ = buffer_size;
  // Received frames start a cache line when asked: the header ends where the line begins.
  const std::uint32_t rx_headroom =
      align_rx_frames ? static_cast<std::uint32_t>(virtq::kCacheLine - hdr_len_) : 0;
  if (buffer_size < rx_headroom + hdr_len_ + 60) {
    return fail(
        Errc::out_of_range,
        fmt::format("buffer size {} can't hold {}{}-byte header and a minimal frame", buffer_size,
                    rx_headroom != 0 ? fmt::format("{} bytes of headroom, a ", rx_headroom)
                                     : std::string("a "),
                    hdr_len_));
  }
  const std::uint16_t count = session_->queue_size();
  rings_.resize(session_->num_rings());
  for (std::uint16_t i = 0; i < rings_.size(); ++i) {
    NetRing& r = rings_[i];
    r.init(session_->ring(i), buffer_size, count, kBurst);
    r.is_rx = (i % 2) == 0;
    if (r.is_rx) {
      r.headroom = rx_headroom;
      if (mrg_rxbuf_) r.merge.resize(kMaxMergedFrame);
      // Every rx buffer goes on the ring now; the device sees them once the ring starts (the
      // session is not started: no kick yet).
      for (std::uint16_t b = 0; b < count; ++b) r.free[r.free_top++] = b;
      r.ring->visit([&](auto& vq) { refill_rx(r, vq); });
    } else {
      for (std::uint16_t b = count; b-- > 0;) r.free[r.free_top++] = b;
    }
  }
  return {};
}

Result<std::array<std::uint8_t, 6>> NetDriver::mac() {
  if (!virtio::has(session_->features(), virtio::net_feature::mac)) {
    return fail(Errc::unsupported, "VIRTIO_NET_F_MAC not negotiated");
  }
  auto c = session_->get_config(0, 6);
  if (!c) return std::unexpected(std::move(c.error()));
  std::array<std::uint8_t, 6> m{};
  std::copy_n(c->begin(), 6, m.begin());
  return m;
}

bool NetDriver::deliver_buffer(NetRing& r, const virtq::DriverQueue::Used& u,
                               std::span<const std::uint8_t>& frame) noexcept {
  const std::uint8_t* p = r.data(static_cast<std::uint16_t>(u.token));
  const std::size_t len = u.len;  // DriverQueue clamps it to the buffer's size
  if (r.merge_left != 0) {
    // A continuation buffer of a mergeable frame: all payload, no header.
    if (!r.merge_bad && r.merge_len + len <= r.merge.size()) {
      std::memcpy(r.merge.data() + r.merge_len, p, len);
      r.merge_len += len;
    } else {
      r.merge_bad = true;
    }
    if (--r.merge_left != 0) return false;
    if (r.merge_bad) {
      ++r.stats.bad;
      return false;
    }
    frame = std::span<const std::uint8_t>(r.merge.data(), r.merge_len);
    return true;
  }
  if (len < hdr_len_) {
    ++r.stats.bad;
    return false;
  }
  std::uint16_t nbuf = 1;
  if (mrg_rxbuf_) {
    std::memcpy(&nbuf, p + offsetof(virtio::VirtioNetHdrMrg, num_buffers), sizeof nbuf);
    if (nbuf == 0 || nbuf > r.buffer_count) {
      ++r.stats.bad;
      return false;
    }
  }
  if (nbuf == 1) {
    frame = std::span<const std::uint8_t>(p + hdr_len_, len - hdr_len_);
    return true;
  }
  r.merge_bad = len - hdr_len_ > r.merge.size();
  r.merge_len = 0;
  if (!r.merge_bad) {
    std::memcpy(r.merge.data(), p + hdr_len_, len - hdr_len_);
    r.merge_len = len - hdr_len_;
  }
  r.merge_left = static_cast<std::uint16_t>(nbuf - 1);
  return false;
}

}  // namespace vhostkit::driver
