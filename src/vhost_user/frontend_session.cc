// The vhost-user front-end: negotiation, shared memory, ring setup and teardown. The data path
// is inline in the header; only its rarely taken pieces live here.
#include "vhostkit/vhost_user/frontend_session.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <algorithm>
#include <utility>

namespace vhostkit::vhost_user {
namespace {

constexpr std::size_t kPage = 4096;
// The largest frame we gather from several mergeable rx buffers (a 64 KiB GSO frame).
constexpr std::size_t kMaxMergedFrame = 65536 + 14 + 4;
// The largest blk request buffer: 16 MiB of data plus a page for header and status.
constexpr std::size_t kMaxBlkBuffer = (16u << 20) + 4096;

constexpr std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

struct Layout {
  std::size_t ring_block = 0;    // bytes per ring (page-aligned)
  std::size_t buffer_block = 0;  // bytes of buffers per ring (page-aligned)
  std::size_t rings = 0;
  std::size_t ring_offset(std::size_t i) const { return i * ring_block; }
  std::size_t buffer_offset(std::size_t i) const { return rings * ring_block + i * buffer_block; }
  std::size_t total() const { return rings * (ring_block + buffer_block); }
};

Layout layout_for(const FrontendOptions& o) {
  Layout l;
  l.rings = o.rings();
  l.ring_block = align_up(virtq::DriverRingLayout::for_size(o.queue_size).total_bytes, kPage);
  l.buffer_block = align_up(std::size_t{o.buffers_per_ring()} * o.buffer_size, kPage);
  return l;
}

std::string ring_step(std::string_view req, std::uint16_t i) {
  return fmt::format("{} ring {}", req, i);
}

}  // namespace

Result<> FrontendOptions::validate() const {
  if (socket_path.empty() && !channel.valid()) {
    return fail(Errc::invalid_argument, "no socket path and no connected channel");
  }
  const bool blk = device == Device::blk;
  if (!blk && (queue_pairs == 0 || queue_pairs > FrontendSession::kMaxQueuePairs)) {
    return fail(Errc::out_of_range, fmt::format("queue pairs {} not in 1..{}", queue_pairs,
                                                FrontendSession::kMaxQueuePairs));
  }
  if (blk && (num_queues == 0 || num_queues > FrontendSession::kMaxQueuePairs)) {
    return fail(Errc::out_of_range, fmt::format("num_queues {} not in 1..{}", num_queues,
                                                FrontendSession::kMaxQueuePairs));
  }
  if (!virtio::is_valid_queue_size(queue_size) || queue_size < 2) {
    return fail(Errc::invalid_argument,
                fmt::format("queue size {} is not a power of two in 2..32768", queue_size));
  }
  const std::size_t min_buffer = blk ? virtio::kBlkSectorSize : 64;
  const std::size_t max_buffer =
      blk ? kMaxBlkBuffer : kMaxMergedFrame + sizeof(virtio::VirtioNetHdrMrg);
  if (buffer_size < min_buffer || buffer_size > max_buffer) {
    return fail(Errc::out_of_range,
                fmt::format("buffer size {} not in {}..{}", buffer_size, min_buffer, max_buffer));
  }
  if (blk && ring_buffers > queue_size) {
    return fail(Errc::out_of_range, fmt::format("{} buffers per ring exceed the ring size {}",
                                                ring_buffers, queue_size));
  }
  const std::size_t need = layout_for(*this).total();
  if (memory_size != 0 && memory_size < need) {
    return fail(Errc::out_of_range,
                fmt::format("memory size {} too small: {} rings of {} with {}-byte buffers need {}",
                            memory_size, rings(), queue_size, buffer_size, need));
  }
  if (timeout.count() <= 0) return fail(Errc::invalid_argument, "timeout must be positive");
  return {};
}

Result<std::unique_ptr<FrontendSession>> FrontendSession::connect(FrontendOptions opts) {
  if (auto v = opts.validate(); !v) return std::unexpected(std::move(v.error()));
  std::unique_ptr<FrontendSession> s(new FrontendSession());
  if (opts.channel.valid()) {
    s->channel_ = std::move(opts.channel);
  } else {
    auto ch = connect_unix(opts.socket_path);
    if (!ch) {
      return fail(ch.error().code,
                  fmt::format("connect to {}: {}", opts.socket_path, ch.error().message()),
                  ch.error().sys_errno);
    }
    s->channel_ = std::move(*ch);
  }
  s->opts_ = std::move(opts);
  if (auto t = s->channel_.set_timeout(s->opts_.timeout); !t) {
    return std::unexpected(s->step_error("socket timeout", t.error()));
  }
  auto fail_all = [&](Error e) {
    s->healthy_ = false;  // don't talk to a back-end that just failed us
    return std::unexpected(std::move(e));
  };
  if (auto r = s->negotiate(); !r) return fail_all(std::move(r.error()));
  if (auto r = s->setup_memory(); !r) return fail_all(std::move(r.error()));
  s->rings_.resize(s->opts_.rings());
  for (std::uint16_t i = 0; i < s->rings_.size(); ++i) {
    if (auto r = s->setup_ring(i); !r) return fail_all(std::move(r.error()));
  }
  if (auto r = s->enable_rings(); !r) return fail_all(std::move(r.error()));
  spdlog::debug("vhost-user {}: connected, features {:#x} protocol {:#x}, {} rings of {}",
                s->opts_.name, s->features_, s->protocol_, s->rings_.size(), s->opts_.queue_size);
  return s;
}

FrontendSession::~FrontendSession() { close(); }

Error FrontendSession::step_error(std::string_view what, const Error& e) const {
  return Error{e.code, e.sys_errno, fmt::format("{}: {}", what, e.detail)};
}

Result<Received> FrontendSession::recv_reply(Request req, std::string_view what) {
  auto msg = channel_.recv();
  if (!msg) {
    healthy_ = false;
    if (msg.error().code == Errc::would_block) {
      return fail(Errc::broken, fmt::format("{}: no reply from the back-end within {} ms", what,
                                            opts_.timeout.count()));
    }
    return std::unexpected(step_error(what, msg.error()));
  }
  (void)req;
  if (msg->fds_truncated) {
    healthy_ = false;
    return fail(Errc::too_many, fmt::format("{}: the back-end's reply came with more than {} fds; "
                                            "all were closed",
                                            what, kMaxFds));
  }
  return msg;
}

template <typename T>
Result<> FrontendSession::request(T& msg, std::string_view what) {
  const bool ack = has_protocol(protocol_feature::reply_ack);
  if (auto r = channel_.send_message(msg, ack ? kNeedReplyFlag : 0); !r) {
    healthy_ = false;
    return std::unexpected(step_error(what, r.error()));
  }
  if (!ack) return {};
  auto reply = recv_reply(T::kRequest, what);
  if (!reply) return std::unexpected(std::move(reply.error()));
  auto v = decode_u64_reply(*reply, T::kRequest);
  if (!v) {
    healthy_ = false;
    return std::unexpected(step_error(what, v.error()));
  }
  if (*v != 0) {
    return fail(Errc::invalid_argument,
                fmt::format("{}: the back-end refused it (REPLY_ACK {:#x})", what, *v));
  }
  return {};
}

Result<std::uint64_t> FrontendSession::query_u64(Request req) {
  const std::string_view what = to_string(req);
  Result<> sent;
  switch (req) {
    case Request::get_features: sent = channel_.send_message(GetFeatures{}); break;
    case Request::get_protocol_features: sent = channel_.send_message(GetProtocolFeatures{}); break;
    case Request::get_queue_num: sent = channel_.send_message(GetQueueNum{}); break;
    default: return fail(Errc::unsupported, fmt::format("{} is not a u64 query", what));
  }
  if (!sent) {
    healthy_ = false;
    return std::unexpected(step_error(what, sent.error()));
  }
  auto reply = recv_reply(req, what);
  if (!reply) return std::unexpected(std::move(reply.error()));
  auto v = decode_u64_reply(*reply, req);
  if (!v) {
    healthy_ = false;
    return std::unexpected(step_error(what, v.error()));
  }
  return *v;
}

Result<> FrontendSession::negotiate() {
  auto offered = query_u64(Request::get_features);
  if (!offered) return std::unexpected(std::move(offered.error()));
  offered_features_ = *offered;

  SetOwner owner;
  // REPLY_ACK is not negotiated yet: this one is fire-and-forget.
  if (auto r = request(owner, "SET_OWNER"); !r) return r;

  const bool blk = opts_.device == FrontendOptions::Device::blk;
  // The feature that allows more than one queue (pair), and how many we want.
  const unsigned mq_bit = blk ? virtio::blk_feature::mq : virtio::net_feature::mq;
  const std::uint16_t queues = blk ? opts_.num_queues : opts_.queue_pairs;
  const std::uint64_t wanted = opts_.features.value_or(
      (blk ? kFrontendBlkFeatures : kFrontendNetFeatures) | (queues > 1 ? virtio::bit(mq_bit) : 0));
  features_ =
      wanted & offered_features_ & (blk ? kFrontendBlkDrivableFeatures : kFrontendDrivableFeatures);
  const bool proto = virtio::has(offered_features_, virtio::feature::protocol_features);
  if (proto) {
    features_ |= virtio::bit(virtio::feature::protocol_features);
    auto p = query_u64(Request::get_protocol_features);
    if (!p) return std::unexpected(std::move(p.error()));
    offered_protocol_ = *p;
    const std::uint64_t acked = offered_protocol_ & opts_.protocol_features;
    SetProtocolFeatures spf{.value = acked};
    if (auto r = request(spf, "SET_PROTOCOL_FEATURES"); !r) return r;
    protocol_ = acked;  // from here on REPLY_ACK (if acked) applies
  } else {
    features_ &= ~virtio::bit(virtio::feature::protocol_features);
  }

  const std::string_view unit = blk ? "queues" : "queue pairs";
  if (queues > 1) {
    if (!virtio::has(features_, mq_bit)) {
      return fail(Errc::unsupported,
                  fmt::format("{} {} wanted but {} is not offered (or not wanted)", queues, unit,
                              blk ? "VIRTIO_BLK_F_MQ" : "VIRTIO_NET_F_MQ"));
    }
    if (!has_protocol(protocol_feature::mq)) {
      return fail(
          Errc::unsupported,
          fmt::format("{} {} wanted but the back-end lacks protocol feature MQ", queues, unit));
    }
  }
  if (has_protocol(protocol_feature::mq)) {
    auto n = query_u64(Request::get_queue_num);
    if (!n) return std::unexpected(std::move(n.error()));
    backend_queue_num_ = *n;
    // Back-ends disagree on the unit for net (QEMU and DPDK: queue pairs; some: virtqueues);
    // either way fewer than our pairs can't work. For blk it is request queues.
    if (backend_queue_num_ < queues) {
      return fail(Errc::unsupported,
                  fmt::format("GET_QUEUE_NUM: the back-end has {} queues, {} {} wanted",
                              backend_queue_num_, queues, unit));
    }
  }

  SetFeatures sf{.value = features_};
  if (auto r = request(sf, "SET_FEATURES"); !r) return r;
  if (blk) return {};
  mrg_rxbuf_ = virtio::has(features_, virtio::net_feature::mrg_rxbuf);
  hdr_len_ = virtio::net_hdr_size(virtio::has(features_, virtio::feature::version_1), mrg_rxbuf_);
  if (opts_.buffer_size < hdr_len_ + 60) {
    return fail(Errc::out_of_range, fmt::format("buffer size {} can't hold a {}-byte header and "
                                                "a minimal frame",
                                                opts_.buffer_size, hdr_len_));
  }
  return {};
}

Result<> FrontendSession::setup_memory() {
  const Layout l = layout_for(opts_);
  mem_size_ = align_up(opts_.memory_size != 0 ? opts_.memory_size : l.total(), kPage);
  memfd_.reset(::memfd_create("vhostkit-frontend", MFD_CLOEXEC));
  if (!memfd_) return fail_errno("memfd_create");
  if (::ftruncate(memfd_.get(), static_cast<off_t>(mem_size_)) != 0) {
    return fail_errno(fmt::format("ftruncate memfd to {} bytes", mem_size_));
  }
  void* p = ::mmap(nullptr, mem_size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   memfd_.get(), 0);
  if (p == MAP_FAILED) return fail_errno(fmt::format("mmap {} bytes of memfd", mem_size_));
  base_ = static_cast<std::uint8_t*>(p);

  SetMemTable mt;
  mt.regions.push_back(memory::RegionFd{
      .spec = memory::RegionSpec{.guest_phys_addr = 0,
                                 .size = mem_size_,
                                 .userspace_addr = reinterpret_cast<std::uint64_t>(base_),
                                 .mmap_offset = 0},
      .fd = std::move(memfd_)});
  auto r = request(mt, "SET_MEM_TABLE");
  memfd_ = std::move(mt.regions[0].fd);  // the message only borrowed it
  return r;
}

Result<> FrontendSession::setup_ring(std::uint16_t i) {
  const Layout l = layout_for(opts_);
  FrontendRing& r = rings_[i];
  r.index = i;
  // net: receiveq first in each pair. blk: every ring is a request queue, driven like a transmitq.
  r.is_rx = opts_.device == FrontendOptions::Device::net && (i % 2) == 0;
  const std::size_t roff = l.ring_offset(i);
  if (auto v =
          r.vq.init(std::span<std::byte>(reinterpret_cast<std::byte*>(base_ + roff), l.ring_block),
                    roff, opts_.queue_size, features_);
      !v) {
    return std::unexpected(step_error(fmt::format("ring {} init", i), v.error()));
  }
  const std::size_t boff = l.buffer_offset(i);
  r.buffers = base_ + boff;
  r.buffers_gpa = boff;
  r.buffer_size = opts_.buffer_size;
  r.buffer_count = opts_.buffers_per_ring();
  r.free.assign(r.buffer_count, 0);
  r.used.resize(std::min<std::size_t>(kBurst, opts_.queue_size));
  r.free_top = 0;
  if (r.is_rx) {
    if (mrg_rxbuf_) r.merge.resize(kMaxMergedFrame);
    // Every rx buffer goes on the ring now; the device sees them once the ring starts.
    for (std::uint16_t b = 0; b < r.buffer_count; ++b) r.free[r.free_top++] = b;
    refill_rx(r);
  } else {
    for (std::uint16_t b = r.buffer_count; b-- > 0;) r.free[r.free_top++] = b;
  }
  if (opts_.notify == FrontendOptions::Notify::poll) r.vq.disable_interrupts();

  SetVringNum num{.index = i, .num = opts_.queue_size};
  if (auto v = request(num, ring_step("SET_VRING_NUM", i)); !v) return v;
  SetVringBase base{.index = i, .num = 0};
  if (auto v = request(base, ring_step("SET_VRING_BASE", i)); !v) return v;
  const auto uva = [&](std::uint64_t gpa) { return reinterpret_cast<std::uint64_t>(base_) + gpa; };
  SetVringAddr addr{.index = i,
                    .addr = {.flags = 0,
                             .desc_user_addr = uva(r.vq.desc_gpa()),
                             .used_user_addr = uva(r.vq.used_gpa()),
                             .avail_user_addr = uva(r.vq.avail_gpa()),
                             .log_guest_addr = 0}};
  if (auto v = request(addr, ring_step("SET_VRING_ADDR", i)); !v) return v;

  const bool event = opts_.notify == FrontendOptions::Notify::event;
  // The call fd goes first so it is in place before the kick starts the ring.
  SetVringCall call{.index = static_cast<std::uint8_t>(i), .fd = {}};
  if (event) {
    call.fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!call.fd) return fail_errno(ring_step("eventfd for SET_VRING_CALL", i));
  }
  auto cr = request(call, ring_step("SET_VRING_CALL", i));
  r.call = std::move(call.fd);
  if (!cr) return cr;
  SetVringKick kick{.index = static_cast<std::uint8_t>(i), .fd = {}};
  if (event) {
    kick.fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!kick.fd) return fail_errno(ring_step("eventfd for SET_VRING_KICK", i));
  }
  auto kr = request(kick, ring_step("SET_VRING_KICK", i));
  r.kick = std::move(kick.fd);
  return kr;
}

Result<> FrontendSession::enable_rings() {
  // Without PROTOCOL_FEATURES the rings are enabled by their kick; with it they start
  // disabled until SET_VRING_ENABLE.
  if (virtio::has(features_, virtio::feature::protocol_features)) {
    for (std::uint16_t i = 0; i < rings_.size(); ++i) {
      SetVringEnable en{.index = i, .num = 1};
      if (auto r = request(en, ring_step("SET_VRING_ENABLE", i)); !r) return r;
    }
  }
  // The rx rings are full of buffers the device has not been told about.
  for (FrontendRing& r : rings_) {
    if (r.is_rx) kick(r.index);
  }
  return {};
}

Result<std::vector<std::uint8_t>> FrontendSession::get_config(std::uint32_t offset,
                                                              std::uint32_t size) {
  if (!has_protocol(protocol_feature::config)) {
    return fail(Errc::unsupported, "GET_CONFIG: protocol feature CONFIG not negotiated");
  }
  if (size == 0 || size > kMaxConfigSize) {
    return fail(Errc::out_of_range,
                fmt::format("GET_CONFIG size {} not in 1..{}", size, kMaxConfigSize));
  }
  if (auto r = channel_.send_message(GetConfig{.offset = offset, .size = size, .flags = 0}); !r) {
    healthy_ = false;
    return std::unexpected(step_error("GET_CONFIG", r.error()));
  }
  auto reply = recv_reply(Request::get_config, "GET_CONFIG");
  if (!reply) return std::unexpected(std::move(reply.error()));
  auto c = decode_config_reply(*reply);
  if (!c) {
    healthy_ = false;
    return std::unexpected(step_error("GET_CONFIG", c.error()));
  }
  if (c->data.empty()) return fail(Errc::invalid_argument, "GET_CONFIG: the back-end refused it");
  if (c->offset != offset || c->data.size() != size) {
    return fail(Errc::broken, fmt::format("GET_CONFIG: asked for {} bytes at {}, got {} at {}",
                                          size, offset, c->data.size(), c->offset));
  }
  return std::move(c->data);
}

Result<std::array<std::uint8_t, 6>> FrontendSession::mac() {
  if (!virtio::has(features_, virtio::net_feature::mac)) {
    return fail(Errc::unsupported, "VIRTIO_NET_F_MAC not negotiated");
  }
  auto c = get_config(0, 6);
  if (!c) return std::unexpected(std::move(c.error()));
  std::array<std::uint8_t, 6> m{};
  std::copy_n(c->begin(), 6, m.begin());
  return m;
}

Result<std::vector<std::uint32_t>> FrontendSession::stop() {
  if (stopped_) return stopped_bases_;
  if (!channel_.valid()) return fail(Errc::disconnected, "GET_VRING_BASE: not connected");
  std::vector<std::uint32_t> bases;
  for (std::uint16_t i = 0; i < rings_.size(); ++i) {
    const std::string what = ring_step("GET_VRING_BASE", i);
    if (auto r = channel_.send_message(GetVringBase{.index = i, .num = 0}); !r) {
      healthy_ = false;
      return std::unexpected(step_error(what, r.error()));
    }
    auto reply = recv_reply(Request::get_vring_base, what);
    if (!reply) return std::unexpected(std::move(reply.error()));
    auto st = decode_vring_state_reply(*reply, Request::get_vring_base);
    if (!st) {
      healthy_ = false;
      return std::unexpected(step_error(what, st.error()));
    }
    if (st->index != i) {
      healthy_ = false;
      return fail(Errc::broken, fmt::format("{}: the reply names ring {}", what, st->index));
    }
    if (st->num > 0xffff) {
      healthy_ = false;
      return fail(Errc::broken, fmt::format("{}: index {} does not fit 16 bits", what, st->num));
    }
    bases.push_back(st->num);
  }
  stopped_ = true;
  stopped_bases_ = bases;
  return bases;
}

void FrontendSession::close() noexcept {
  if (channel_.valid() && healthy_ && !stopped_ && !rings_.empty()) {
    if (auto r = stop(); !r) {
      spdlog::debug("vhost-user {}: teardown: {}", opts_.name, r.error().message());
    }
  }
  stopped_ = true;           // the data path is over either way
  (void)channel_.release();  // closes the socket
  rings_.clear();
  if (base_ != nullptr) {
    ::munmap(base_, mem_size_);
    base_ = nullptr;
    mem_size_ = 0;
  }
  memfd_.reset();
}

void FrontendSession::refill_rx(FrontendRing& r) noexcept {
  std::size_t added = 0;
  while (r.free_top > 0) {
    const std::uint16_t b = r.free[r.free_top - 1];
    const virtq::DriverQueue::Buffer in{r.buffer_gpa(b), r.buffer_size};
    if (!r.vq.add({}, std::span(&in, 1), b)) break;
    --r.free_top;
    ++added;
  }
  if (added != 0) {
    r.vq.publish();
    if (!stopped_) kick_if_needed(r.index);
  }
}

bool FrontendSession::deliver_buffer(FrontendRing& r, const virtq::DriverQueue::Used& u,
                                     std::span<const std::uint8_t>& frame) noexcept {
  const std::uint8_t* p = r.buffer(static_cast<std::uint16_t>(u.token));
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

bool FrontendSession::wait_call(std::uint16_t i, std::chrono::milliseconds timeout) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.call.valid()) return true;  // poll mode: the caller just polls again
  // enable_interrupts re-reads used->idx after arming: a completion that raced with it is seen
  // here rather than waited for.
  if (r.vq.enable_interrupts()) return true;
  pollfd pfd{r.call.get(), POLLIN, 0};
  const int n = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  if (n <= 0) return false;
  std::uint64_t v = 0;
  if (::read(r.call.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v)) ++r.stats.calls;
  return true;
}

}  // namespace vhostkit::vhost_user
