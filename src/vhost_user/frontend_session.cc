// The vhost-user front-end's protocol side: negotiation, shared memory, ring setup and teardown.
#include "vhostkit/vhost_user/frontend_session.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <algorithm>
#include <utility>

namespace vhostkit::vhost_user {
namespace {

constexpr std::size_t kPage = 4096;

constexpr std::size_t align_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// Rings first, then each ring's driver area.
struct Layout {
  std::size_t ring_block = 0;  // bytes per ring (page-aligned)
  std::size_t area_block = 0;  // bytes of driver area per ring (page-aligned)
  std::size_t rings = 0;
  std::size_t ring_offset(std::size_t i) const { return i * ring_block; }
  std::size_t area_offset(std::size_t i) const { return rings * ring_block + i * area_block; }
  std::size_t total() const { return rings * (ring_block + area_block); }
};

Layout layout_for(const FrontendOptions& o) {
  Layout l;
  l.rings = o.rings;
  // Room for either layout: validate() sizes the memory before the features are negotiated.
  l.ring_block = align_up(std::max(virtq::DriverRingLayout::for_size(o.queue_size).total_bytes,
                                   virtq::PackedRingLayout::for_size(o.queue_size).total_bytes),
                          kPage);
  l.area_block = align_up(o.ring_area_bytes, kPage);
  return l;
}

std::string ring_step(std::string_view req, std::uint16_t i) {
  return fmt::format("{} ring {}", req, i);
}

}  // namespace

std::size_t FrontendOptions::layout_bytes() const noexcept { return layout_for(*this).total(); }

Result<> FrontendOptions::validate() const {
  if (socket_path.empty() && !channel.valid()) {
    return fail(Errc::invalid_argument, "no socket path and no connected channel");
  }
  if (rings == 0 || rings > FrontendSession::kMaxRings) {
    return fail(Errc::out_of_range,
                fmt::format("rings {} not in 1..{}", rings, FrontendSession::kMaxRings));
  }
  if (!virtio::is_valid_queue_size(queue_size) || queue_size < 2) {
    return fail(Errc::invalid_argument,
                fmt::format("queue size {} is not a power of two in 2..32768", queue_size));
  }
  if (queues.count == 0 || queues.count > rings) {
    return fail(Errc::out_of_range,
                fmt::format("{} {} on {} rings", queues.count, queues.unit, rings));
  }
  // An area no mmap could hold: refused before its size is rounded and multiplied.
  if (ring_area_bytes > (std::size_t{1} << 40)) {
    return fail(Errc::out_of_range, fmt::format("ring area {} bytes too large", ring_area_bytes));
  }
  const std::size_t need = layout_bytes();
  if (memory_size != 0 && memory_size < need) {
    return fail(Errc::out_of_range,
                fmt::format("memory size {} too small: {} rings of {} with {} bytes of buffers "
                            "each need {}",
                            memory_size, rings, queue_size, ring_area_bytes, need));
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
  s->rings_.resize(s->opts_.rings);
  for (std::uint16_t i = 0; i < s->rings_.size(); ++i) {
    if (auto r = s->layout_ring(i); !r) return fail_all(std::move(r.error()));
  }
  return s;
}

Result<> FrontendSession::start_rings() {
  if (started_ || stopped_) return fail(Errc::bad_state, "the rings were started already");
  started_ = true;
  for (std::uint16_t i = 0; i < rings_.size(); ++i) {
    if (auto r = start_ring(i); !r) {
      healthy_ = false;
      return r;
    }
  }
  // Without PROTOCOL_FEATURES the rings are enabled by their kick; with it they start
  // disabled until SET_VRING_ENABLE.
  if (virtio::has(features_, virtio::feature::protocol_features)) {
    for (std::uint16_t i = 0; i < rings_.size(); ++i) {
      SetVringEnable en{.index = i, .num = 1};
      if (auto r = request(en, ring_step("SET_VRING_ENABLE", i)); !r) {
        healthy_ = false;
        return r;
      }
    }
  }
  spdlog::debug("vhost-user {}: connected, features {:#x} protocol {:#x}, {} {} rings of {}{}",
                opts_.name, features_, protocol_, rings_.size(), to_string(layout()),
                opts_.queue_size, in_order() ? ", in order" : "");
  return {};
}

FrontendSession::~FrontendSession() { close(); }

Error FrontendSession::step_error(std::string_view what, const Error& e) const {
  return Error{e.code, e.sys_errno, fmt::format("{}: {}", what, e.detail)};
}

Result<Received> FrontendSession::recv_reply(std::string_view what) {
  auto msg = channel_.recv();
  if (!msg) {
    healthy_ = false;
    if (msg.error().code == Errc::would_block) {
      return fail(Errc::broken, fmt::format("{}: no reply from the back-end within {} ms", what,
                                            opts_.timeout.count()));
    }
    return std::unexpected(step_error(what, msg.error()));
  }
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
  auto reply = recv_reply(what);
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
  auto reply = recv_reply(what);
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

  features_ = opts_.features & offered_features_ & opts_.drivable;
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

  const auto& q = opts_.queues;
  if (q.count > 1) {
    if (!virtio::has(features_, q.mq_feature)) {
      return fail(Errc::unsupported,
                  fmt::format("{} {} wanted but {} is not offered (or not wanted)", q.count, q.unit,
                              q.mq_name));
    }
    if (!has_protocol(protocol_feature::mq)) {
      return fail(
          Errc::unsupported,
          fmt::format("{} {} wanted but the back-end lacks protocol feature MQ", q.count, q.unit));
    }
  }
  if (has_protocol(protocol_feature::mq)) {
    auto n = query_u64(Request::get_queue_num);
    if (!n) return std::unexpected(std::move(n.error()));
    backend_queue_num_ = *n;
    // Back-ends disagree on the unit (QEMU and DPDK count queue pairs where a device pairs its
    // rings, some count rings); either way fewer than the driver's count can't work.
    if (backend_queue_num_ < q.count) {
      return fail(Errc::unsupported,
                  fmt::format("GET_QUEUE_NUM: the back-end has {} queues, {} {} wanted",
                              backend_queue_num_, q.count, q.unit));
    }
  }

  SetFeatures sf{.value = features_};
  return request(sf, "SET_FEATURES");
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
  auto& region = mt.regions.emplace_back();
  region.spec = memory::RegionSpec{.guest_phys_addr = 0,
                                   .size = mem_size_,
                                   .userspace_addr = reinterpret_cast<std::uint64_t>(base_),
                                   .mmap_offset = 0};
  region.fd = std::move(memfd_);
  auto r = request(mt, "SET_MEM_TABLE");
  memfd_ = std::move(mt.regions[0].fd);  // the message only borrowed it
  return r;
}

Result<> FrontendSession::layout_ring(std::uint16_t i) {
  const Layout l = layout_for(opts_);
  FrontendRing& r = rings_[i];
  r.index = i;
  const std::size_t roff = l.ring_offset(i);
  const std::span<std::byte> mem(reinterpret_cast<std::byte*>(base_ + roff), l.ring_block);
  r.packed = layout() == RingLayout::packed;
  if (auto v = r.packed ? r.pvq.init(mem, roff, opts_.queue_size, features_)
                        : r.vq.init(mem, roff, opts_.queue_size, features_);
      !v) {
    return std::unexpected(step_error(fmt::format("ring {} init", i), v.error()));
  }
  const std::size_t aoff = l.area_offset(i);
  r.area = base_ + aoff;
  r.area_gpa = aoff;
  r.area_bytes = opts_.ring_area_bytes;
  if (opts_.notify == FrontendOptions::Notify::poll) r.disable_interrupts();
  return {};
}

Result<> FrontendSession::start_ring(std::uint16_t i) {
  FrontendRing& r = rings_[i];
  SetVringNum num{.index = i, .num = opts_.queue_size};
  if (auto v = request(num, ring_step("SET_VRING_NUM", i)); !v) return v;
  // A fresh packed ring starts at descriptor 0 with both wrap counters at 1 (vhost-user.rst:
  // avail index and wrap counter in bits 0-15, used index and wrap counter in bits 16-31).
  SetVringBase base{.index = i, .num = r.packed ? virtq::PackedRingBase{}.encode() : 0};
  if (auto v = request(base, ring_step("SET_VRING_BASE", i)); !v) return v;
  const auto uva = [&](std::uint64_t gpa) { return reinterpret_cast<std::uint64_t>(base_) + gpa; };
  // A packed ring has three parts too: the descriptor ring, the driver event suppression area
  // (sent as "avail") and the device's (sent as "used").
  SetVringAddr addr{
      .index = i,
      .addr = {.flags = 0,
               .desc_user_addr = uva(r.packed ? r.pvq.desc_gpa() : r.vq.desc_gpa()),
               .used_user_addr = uva(r.packed ? r.pvq.device_event_gpa() : r.vq.used_gpa()),
               .avail_user_addr = uva(r.packed ? r.pvq.driver_event_gpa() : r.vq.avail_gpa()),
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
  auto reply = recv_reply("GET_CONFIG");
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

Result<std::vector<std::uint32_t>> FrontendSession::stop() {
  if (stopped_) return stopped_bases_;
  if (!channel_.valid()) return fail(Errc::disconnected, "GET_VRING_BASE: not connected");
  if (!started_) return fail(Errc::bad_state, "GET_VRING_BASE: the rings were never started");
  std::vector<std::uint32_t> bases;
  for (std::uint16_t i = 0; i < rings_.size(); ++i) {
    const std::string what = ring_step("GET_VRING_BASE", i);
    if (auto r = channel_.send_message(GetVringBase{.index = i, .num = 0}); !r) {
      healthy_ = false;
      return std::unexpected(step_error(what, r.error()));
    }
    auto reply = recv_reply(what);
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
    if (layout() == RingLayout::packed) {
      const auto b = virtq::PackedRingBase::decode(st->num);
      if (b.avail_idx >= opts_.queue_size || b.used_idx >= opts_.queue_size) {
        healthy_ = false;
        return fail(Errc::broken,
                    fmt::format("{}: packed position {:#x} (avail {}, used {}) is not on a ring "
                                "of {}",
                                what, st->num, b.avail_idx, b.used_idx, opts_.queue_size));
      }
    } else if (st->num > 0xffff) {
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
  if (channel_.valid() && healthy_ && started_ && !stopped_ && !rings_.empty()) {
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

bool FrontendSession::wait_call(std::uint16_t i, std::chrono::milliseconds timeout) noexcept {
  FrontendRing& r = rings_[i];
  if (!r.call.valid()) return true;  // poll mode: the caller just polls again
  // enable_interrupts re-reads used->idx after arming: a completion that raced with it is seen
  // here rather than waited for.
  if (r.enable_interrupts()) return true;
  pollfd pfd{r.call.get(), POLLIN, 0};
  const int n = ::poll(&pfd, 1, static_cast<int>(timeout.count()));
  if (n <= 0) return false;
  std::uint64_t v = 0;
  if (::read(r.call.get(), &v, sizeof v) == static_cast<ssize_t>(sizeof v)) ++r.calls;
  return true;
}

}  // namespace vhostkit::vhost_user
