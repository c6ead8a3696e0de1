// BackendSession: one front-end's requests, decoded by the codec, turned into vhost::Device
// calls, answered as the protocol (and REPLY_ACK) asks.
#include "vhostkit/vhost_user/backend_session.h"

#include <poll.h>

#include <cerrno>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "vhostkit/virtio/features.h"
#include "vhostkit/virtio/net.h"

namespace vhostkit::vhost_user {

namespace {

constexpr std::uint32_t kLogBurst = 10;  // failure lines per second before we summarise

}  // namespace

// What a handler wants the front-end to hear: the result (for REPLY_ACK and the log) and, for
// requests with a reply body, that body.
struct BackendSession::Outcome {
  Result<> result;
  std::optional<OutMessage> reply;

  static Outcome ok() { return {}; }
  static Outcome err(Error e) { return {std::unexpected(std::move(e)), std::nullopt}; }
  static Outcome from(Result<> r) { return {std::move(r), std::nullopt}; }
  static Outcome with_reply(OutMessage m, Result<> r = {}) { return {std::move(r), std::move(m)}; }
};

BackendSession::BackendSession(vhost::Device& device, Channel channel, SessionOptions opts)
    : device_(device), channel_(std::move(channel)), opts_(std::move(opts)) {
  offered_protocol_ = opts_.protocol_features & kSupportedProtocolFeatures;
  if (!opts_.set_mtu) offered_protocol_ &= ~protocol_bit(protocol_feature::net_mtu);
  if (!device_.backend().tracks_inflight()) {
    offered_protocol_ &= ~protocol_bit(protocol_feature::inflight_shmfd);
  }
  // VHOST_F_LOG_ALL: live migration. Once acked (with a log from SET_LOG_BASE) every device
  // write to guest memory is marked: the buffers through vhost::Queue::log_write, the used ring
  // through VHOST_VRING_F_LOG.
  device_.add_offered_features(virtio::bit(virtio::feature::protocol_features) |
                               virtio::bit(virtio::feature::log_all));
}

BackendSession::~BackendSession() { close(); }

void BackendSession::close() noexcept {
  if (closed_) return;
  closed_ = true;
  device_.reset();
  log_fd_.reset();
  channel_.release().reset();
}

void BackendSession::note_failure(Request request, const Error& err) {
  ++stats_.failed;
  last_error_ = err;
  const auto now = std::chrono::steady_clock::now();
  if (now - log_window_ >= std::chrono::seconds(1)) {
    if (suppressed_ != 0) {
      spdlog::warn("vhost-user {}: {} more failed requests were not logged", opts_.name,
                   suppressed_);
    }
    log_window_ = now;
    logged_in_window_ = 0;
    suppressed_ = 0;
  }
  if (logged_in_window_ < kLogBurst) {
    ++logged_in_window_;
    spdlog::warn("vhost-user {}: {} failed: {}", opts_.name, to_string(request), err.message());
  } else {
    ++suppressed_;
  }
}

// ---- the loop ---------------------------------------------------------------------------

Result<> BackendSession::run(int stop_fd) {
  Result<> result;
  while (channel_.valid()) {
    pollfd fds[2] = {{channel_.fd(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
    const nfds_t n = stop_fd >= 0 ? 2 : 1;
    const int r = ::poll(fds, n, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      result = fail_errno("poll on the vhost-user socket");
      break;
    }
    if (n == 2 && fds[1].revents != 0) break;  // asked to stop
    if (fds[0].revents == 0) continue;
    auto served = serve_one();
    if (!served) {
      if (served.error().code != Errc::disconnected) {
        spdlog::error("vhost-user {}: closing the connection: {}", opts_.name,
                      served.error().message());
        result = std::move(served);
      } else {
        spdlog::info("vhost-user {}: front-end disconnected", opts_.name);
      }
      break;
    }
  }
  close();
  return result;
}

Result<> BackendSession::serve_one() {
  if (!channel_.valid()) return fail(Errc::disconnected, "the session is closed");
  auto received = channel_.recv();
  if (!received) {
    switch (received.error().code) {
      case Errc::would_block:
        return {};  // nothing arrived within the timeout; the stream is still in sync
      default: return std::unexpected(std::move(received.error()));
    }
  }
  ++stats_.requests;
  const Header header = received->header;
  if (header.version() != kVersion) {
    // Not our protocol (or not framed the way we think): nothing after it can be trusted.
    return fail(Errc::broken, fmt::format("{} has version {} in its flags, expected {}",
                                          to_string(static_cast<Request>(header.request)),
                                          header.version(), kVersion));
  }
  auto msg = decode(std::move(*received));
  if (!msg) {
    note_failure(static_cast<Request>(header.request), msg.error());
    return reply_failed_request(header, msg.error());
  }
  Outcome out = dispatch(*msg, header);
  return finish(header, std::move(out));
}

BackendSession::Outcome BackendSession::dispatch(FrontendMessage& msg, const Header&) {
  return std::visit([this](auto& m) { return on(m); }, msg);
}

Result<> BackendSession::finish(const Header& header, Outcome out) {
  const auto request = static_cast<Request>(header.request);
  if (!out.result) note_failure(request, out.result.error());
  if (out.reply) {
    ++stats_.replies;
    return channel_.send(*out.reply);
  }
  if (header.need_reply() && reply_ack_on()) {
    ++stats_.acks;
    return channel_.send(reply_ack(request, out.result.has_value()));
  }
  return {};
}

Result<> BackendSession::reply_failed_request(const Header& header, const Error&) {
  const auto request = static_cast<Request>(header.request);
  if (request == Request::get_config) {
    ++stats_.replies;
    return channel_.send(reply_config(0, 0, {}));
  }
  const ReplyRule rule = reply_rule(request);
  if (rule == ReplyRule::body ||
      (rule == ReplyRule::body_if_log_shmfd && has(protocol_feature::log_shmfd))) {
    ++stats_.replies;
    return channel_.send(reply_u64(request, 1));
  }
  if (header.need_reply() && reply_ack_on()) {
    ++stats_.acks;
    return channel_.send(reply_ack(request, false));
  }
  return {};
}

// ---- handlers ---------------------------------------------------------------------------

namespace {
Error need(std::string_view what, std::string_view feature) {
  return Error{
      Errc::bad_state, 0,
      fmt::format("{} needs protocol feature {}, which was not negotiated", what, feature)};
}
}  // namespace

BackendSession::Outcome BackendSession::on(GetFeatures&) {
  return Outcome::with_reply(reply_u64(Request::get_features, device_.offered_features()));
}

BackendSession::Outcome BackendSession::on(SetFeatures& m) {
  if (!device_.has_owner()) {
    // DPDK's virtio-user in server mode sends no SET_OWNER when a restarted back-end
    // reconnects to it (22.11: GET_FEATURES, ..., SET_FEATURES, SET_MEM_TABLE). SET_FEATURES
    // starts a session as surely as SET_OWNER does, and the connection is the unit of trust
    // either way, so it makes this front-end the owner. Ring and memory messages before it are
    // still refused.
    if (auto r = device_.set_owner(); !r) return Outcome::err(r.error());
    owner_implicit_ = true;
    spdlog::info(
        "vhost-user {}: SET_FEATURES without SET_OWNER; taking it as the start of the "
        "session (a reconnecting DPDK virtio-user does this)",
        opts_.name);
  }
  return Outcome::from(device_.set_features(m.value));
}

BackendSession::Outcome BackendSession::on(SetOwner&) {
  // Front-ends that send SET_OWNER after SET_FEATURES (the owner was taken then) are served as
  // if the two had come in the usual order; a SET_OWNER after that is a second owner, refused.
  if (std::exchange(owner_implicit_, false) && device_.has_owner()) return Outcome::ok();
  return Outcome::from(device_.set_owner());
}

BackendSession::Outcome BackendSession::on(ResetOwner&) {
  // Deprecated; the spec recommends treating it as "disable all rings" and nothing more.
  if (auto r = device_.check_owner("RESET_OWNER"); !r) return Outcome::from(std::move(r));
  for (std::uint32_t i = 0; i < device_.num_queues(); ++i) {
    (void)device_.set_vring_enable(i, false);
  }
  // Every ring is stopped with its answers published: the region records nothing more.
  return Outcome::from(device_.set_inflight("RESET_OWNER", nullptr));
}

BackendSession::Outcome BackendSession::on(SetMemTable& m) {
  // A refused table changed nothing (vhost::Device::set_mem_table): the old one and the rings
  // on it stay as they were, and the front-end hears of the failure like any other (a failure
  // ack with NEED_REPLY, which QEMU sets for this request; a log line otherwise). QEMU only logs
  // a refused update of a running device and carries on: rings still served on the old table
  // keep the guest's device working, where dropping the table would stop it with QEMU unaware.
  return Outcome::from(device_.set_mem_table(std::move(m.regions)));
}

BackendSession::Outcome BackendSession::on(SetLogBase& m) {
  if (!has(protocol_feature::log_shmfd)) {
    // Without LOG_SHMFD there is no reply to send; the failure is acked or logged.
    return Outcome::err(need("SET_LOG_BASE", "LOG_SHMFD"));
  }
  auto r = device_.set_log_base(std::move(m.fd), m.mmap_size, m.mmap_offset);
  const bool ok = r.has_value();
  return Outcome::with_reply(reply_u64(Request::set_log_base, ok ? 0 : 1), std::move(r));
}

BackendSession::Outcome BackendSession::on(SetLogFd& m) {
  if (auto r = device_.check_owner("SET_LOG_FD"); !r) return Outcome::from(std::move(r));
  log_fd_ = std::move(m.fd);
  return Outcome::ok();
}

BackendSession::Outcome BackendSession::on(SetVringNum& m) {
  return Outcome::from(device_.set_vring_num(m.index, m.num));
}

BackendSession::Outcome BackendSession::on(SetVringAddr& m) {
  return Outcome::from(device_.set_vring_addr(m.index, m.addr));
}

BackendSession::Outcome BackendSession::on(SetVringBase& m) {
  return Outcome::from(device_.set_vring_base(m.index, m.num));
}

BackendSession::Outcome BackendSession::on(GetVringBase& m) {
  auto base = device_.get_vring_base(m.index);
  if (!base) {
    // No vring state we could honestly report: a non-zero u64 fails the front-end's read
    // instead of leaving it waiting.
    return Outcome::with_reply(reply_u64(Request::get_vring_base, 1),
                               std::unexpected(std::move(base.error())));
  }
  return Outcome::with_reply(reply_vring_state(Request::get_vring_base, m.index, *base));
}

BackendSession::Outcome BackendSession::on(SetVringKick& m) {
  // The device checks the owner and the index, in this request's name.
  auto r = device_.set_vring_kick(m.index, std::move(m.fd));
  if (!r) return Outcome::from(std::move(r));
  // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it gets its kick;
  // with it, rings stay disabled until SET_VRING_ENABLE. The kick is in place, so the ring
  // starts once, on the enable.
  if ((device_.features() & virtio::bit(virtio::feature::protocol_features)) == 0) {
    return Outcome::from(device_.set_vring_enable(m.index, true));
  }
  return Outcome::ok();
}

BackendSession::Outcome BackendSession::on(SetVringCall& m) {
  return Outcome::from(device_.set_vring_call(m.index, std::move(m.fd)));
}

BackendSession::Outcome BackendSession::on(SetVringErr& m) {
  return Outcome::from(device_.set_vring_err(m.index, std::move(m.fd)));
}

BackendSession::Outcome BackendSession::on(GetProtocolFeatures&) {
  return Outcome::with_reply(reply_u64(Request::get_protocol_features, offered_protocol_));
}

BackendSession::Outcome BackendSession::on(SetProtocolFeatures& m) {
  const std::uint64_t extra = m.value & ~offered_protocol_;
  if (extra != 0) {
    return Outcome::err(Error{
        Errc::unsupported, 0,
        fmt::format("SET_PROTOCOL_FEATURES 0x{:x}: bits not offered: 0x{:x}", m.value, extra)});
  }
  protocol_ = m.value;
  return Outcome::ok();
}

BackendSession::Outcome BackendSession::on(GetQueueNum&) {
  const std::uint64_t n = opts_.queue_num != 0 ? opts_.queue_num : device_.num_queues();
  return Outcome::with_reply(reply_u64(Request::get_queue_num, n));
}

BackendSession::Outcome BackendSession::on(SetVringEnable& m) {
  // The spec says front-ends send this only with PROTOCOL_FEATURES negotiated; a front-end
  // that sends it anyway gets what it asked for (as DPDK does), which is harmless.
  if (m.num > 1) {
    return Outcome::err(Error{
        Errc::invalid_argument, 0,
        fmt::format("SET_VRING_ENABLE: vring {} state {} is neither 0 nor 1", m.index, m.num)});
  }
  return Outcome::from(device_.set_vring_enable(m.index, m.num == 1));
}

BackendSession::Outcome BackendSession::on(SendRarp& m) {
  if (!has(protocol_feature::rarp)) return Outcome::err(need("SEND_RARP", "RARP"));
  if (auto r = device_.check_owner("SEND_RARP"); !r) return Outcome::from(std::move(r));
  if (!opts_.send_rarp) {
    return Outcome::err(Error{Errc::unsupported, 0, "SEND_RARP: this device cannot announce"});
  }
  return Outcome::from(opts_.send_rarp(m.mac));
}

BackendSession::Outcome BackendSession::on(NetSetMtu& m) {
  if (!has(protocol_feature::net_mtu)) return Outcome::err(need("NET_SET_MTU", "NET_MTU"));
  if (auto r = device_.check_owner("NET_SET_MTU"); !r) return Outcome::from(std::move(r));
  if (m.value < virtio::kNetMinMtu || m.value > virtio::kNetMaxMtu) {
    return Outcome::err(Error{Errc::out_of_range, 0,
                              fmt::format("NET_SET_MTU: {} is outside {}..{}", m.value,
                                          virtio::kNetMinMtu, virtio::kNetMaxMtu)});
  }
  return Outcome::from(opts_.set_mtu(static_cast<std::uint16_t>(m.value)));
}

BackendSession::Outcome BackendSession::on(GetConfig& m) {
  auto failed = [&](Error e) {
    return Outcome::with_reply(reply_config(m.offset, m.flags, {}), std::unexpected(std::move(e)));
  };
  if (!has(protocol_feature::config)) return failed(need("GET_CONFIG", "CONFIG"));
  std::array<std::uint8_t, kMaxConfigSize> buf{};
  std::span<std::uint8_t> out(buf.data(), m.size);
  if (auto r = device_.backend().read_config(m.offset, out); !r)
    return failed(std::move(r.error()));
  return Outcome::with_reply(reply_config(m.offset, m.flags, out));
}

BackendSession::Outcome BackendSession::on(SetConfig& m) {
  if (!has(protocol_feature::config)) return Outcome::err(need("SET_CONFIG", "CONFIG"));
  if (auto r = device_.check_owner("SET_CONFIG"); !r) return Outcome::from(std::move(r));
  return Outcome::from(device_.backend().write_config(m.offset, m.data));
}

Result<> BackendSession::check_inflight(std::string_view request, const Inflight& shape) const {
  if (!has(protocol_feature::inflight_shmfd)) {
    return std::unexpected(need(request, "INFLIGHT_SHMFD"));
  }
  if (auto r = device_.check_owner(request); !r) return r;
  if (shape.num_queues == 0 || shape.num_queues > device_.num_queues()) {
    return fail(Errc::out_of_range, fmt::format("{}: num_queues {} (the device has {} queues)",
                                                request, shape.num_queues, device_.num_queues()));
  }
  return {};
}

bool BackendSession::packed_negotiated() const noexcept {
  return virtio::has(device_.features(), virtio::feature::ring_packed);
}

BackendSession::Outcome BackendSession::on(GetInflightFd& m) {
  // A failure still gets a reply, one the front-end can't take for a region: a u64.
  auto failed = [](Error e) {
    return Outcome::with_reply(reply_u64(Request::get_inflight_fd, 1),
                               std::unexpected(std::move(e)));
  };
  const Inflight& want = m.inflight;
  if (auto r = check_inflight("GET_INFLIGHT_FD", want); !r) return failed(std::move(r.error()));
  if (packed_negotiated()) {
    // The packed layout (descriptor states by buffer id) is not implemented. A region recorded
    // in the split layout would be read as the packed one after a restart; none at all is what
    // the spec lets a back-end answer: mmap_size 0 and no fd, which QEMU takes as "no inflight
    // tracking" and starts the device anyway (its features came first, in
    // vhost_dev_prepare_inflight).
    spdlog::warn(
        "vhost-user {}: GET_INFLIGHT_FD on a packed ring: no region (inflight tracking "
        "covers split rings only; a restart may repeat or lose requests completed out "
        "of order)",
        opts_.name);
    const Inflight none{.mmap_size = 0,
                        .mmap_offset = 0,
                        .num_queues = want.num_queues,
                        .queue_size = want.queue_size};
    return Outcome::with_reply(reply_inflight(none, -1));
  }
  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, want.num_queues,
                                                want.queue_size);
  if (!region) return failed(std::move(region.error()));
  auto owned = std::make_unique<vhost::InflightRegion>(std::move(*region));
  const Inflight reply{.mmap_size = owned->mmap_size(),
                       .mmap_offset = owned->mmap_offset(),
                       .num_queues = want.num_queues,
                       .queue_size = want.queue_size};
  const int fd = owned->fd();  // the device keeps the region; the reply goes out before any change
  // The device records into it from here on, as if the front-end had sent it back (QEMU does,
  // with SET_INFLIGHT_FD, before it starts the rings).
  if (auto r = device_.set_inflight("GET_INFLIGHT_FD", std::move(owned)); !r) {
    return failed(std::move(r.error()));
  }
  return Outcome::with_reply(reply_inflight(reply, fd));
}

BackendSession::Outcome BackendSession::on(SetInflightFd& m) {
  const Inflight& shape = m.inflight;
  if (auto r = check_inflight("SET_INFLIGHT_FD", shape); !r) return Outcome::from(std::move(r));
  if (packed_negotiated()) {
    // See GET_INFLIGHT_FD: a region here would be read in the wrong layout.
    return Outcome::err(Error{Errc::unsupported, 0,
                              "SET_INFLIGHT_FD: the packed ring was negotiated and its inflight "
                              "layout is not supported"});
  }
  // Every field of the region is checked by attach (its size and offset against the fd) and
  // again by each ring's recovery; the peer may write it at any time.
  auto region = vhost::InflightRegion::attach(std::move(m.fd), shape.mmap_size, shape.mmap_offset,
                                              vhost::InflightLayout::split, shape.num_queues,
                                              shape.queue_size);
  if (!region) return Outcome::err(std::move(region.error()));
  return Outcome::from(device_.set_inflight(
      "SET_INFLIGHT_FD", std::make_unique<vhost::InflightRegion>(std::move(*region))));
}

BackendSession::Outcome BackendSession::on(ResetDevice&) {
  if (!has(protocol_feature::reset_device)) {
    return Outcome::err(need("RESET_DEVICE", "RESET_DEVICE"));
  }
  if (auto r = device_.check_owner("RESET_DEVICE"); !r) return Outcome::from(std::move(r));
  // Back to a fresh device; the front-end keeps ownership and the protocol features it
  // negotiated (they belong to the connection, and it won't send them again).
  device_.reset();
  log_fd_.reset();
  status_ = 0;
  owner_implicit_ = false;
  return Outcome::from(device_.set_owner());
}

BackendSession::Outcome BackendSession::on(GetMaxMemSlots&) {
  return Outcome::with_reply(
      reply_u64(Request::get_max_mem_slots, memory::GuestMemory::kMaxRegions));
}

BackendSession::Outcome BackendSession::on(AddMemReg& m) {
  if (!has(protocol_feature::configure_mem_slots)) {
    return Outcome::err(need("ADD_MEM_REG", "CONFIGURE_MEM_SLOTS"));
  }
  // The device checks the owner; the table, the slot limit it advertises (GET_MAX_MEM_SLOTS).
  return Outcome::from(device_.add_mem_region(std::move(m.region)));
}

BackendSession::Outcome BackendSession::on(RemMemReg& m) {
  if (!has(protocol_feature::configure_mem_slots)) {
    return Outcome::err(need("REM_MEM_REG", "CONFIGURE_MEM_SLOTS"));
  }
  return Outcome::from(device_.remove_mem_region(m.spec));
}

BackendSession::Outcome BackendSession::on(SetStatus& m) {
  if (!has(protocol_feature::status)) return Outcome::err(need("SET_STATUS", "STATUS"));
  if (auto r = device_.check_owner("SET_STATUS"); !r) return Outcome::from(std::move(r));
  if (m.value > 0xff) {
    return Outcome::err(
        Error{Errc::invalid_argument, 0,
              fmt::format("SET_STATUS 0x{:x} does not fit the 8-bit status", m.value)});
  }
  status_ = static_cast<std::uint8_t>(m.value);
  return Outcome::ok();
}

BackendSession::Outcome BackendSession::on(GetStatus&) {
  // Answered whatever was negotiated: the front-end waits for it.
  return Outcome::with_reply(reply_u64(Request::get_status, status_));
}

template <typename T>
BackendSession::Outcome BackendSession::on(T&) {
  constexpr Request request = T::kRequest;
  Error e{Errc::unsupported, 0,
          fmt::format("{} is not supported by this back-end", to_string(request))};
  if constexpr (request == Request::get_config) {
    return Outcome::with_reply(reply_config(0, 0, {}), std::unexpected(std::move(e)));
  } else {
    if (reply_rule(request) == ReplyRule::body) {
      return Outcome::with_reply(reply_u64(request, 1), std::unexpected(std::move(e)));
    }
    return Outcome::err(std::move(e));
  }
}

}  // namespace vhostkit::vhost_user
