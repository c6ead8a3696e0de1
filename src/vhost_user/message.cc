// The vhost-user codec: the only code that reads or writes payload bytes.
#include "vhostkit/vhost_user/message.h"

#include <fmt/format.h>

#include <cstring>
#include <utility>

namespace vhostkit::vhost_user {

namespace {

constexpr std::string_view kRequestNames[] = {
    "NONE",
    "GET_FEATURES",
    "SET_FEATURES",
    "SET_OWNER",
    "RESET_OWNER",
    "SET_MEM_TABLE",
    "SET_LOG_BASE",
    "SET_LOG_FD",
    "SET_VRING_NUM",
    "SET_VRING_ADDR",
    "SET_VRING_BASE",
    "GET_VRING_BASE",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ERR",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_VRING_ENABLE",
    "SEND_RARP",
    "NET_SET_MTU",
    "SET_BACKEND_REQ_FD",
    "IOTLB_MSG",
    "SET_VRING_ENDIAN",
    "GET_CONFIG",
    "SET_CONFIG",
    "CREATE_CRYPTO_SESSION",
    "CLOSE_CRYPTO_SESSION",
    "POSTCOPY_ADVISE",
    "POSTCOPY_LISTEN",
    "POSTCOPY_END",
    "GET_INFLIGHT_FD",
    "SET_INFLIGHT_FD",
    "GPU_SET_SOCKET",
    "RESET_DEVICE",
    "VRING_KICK",
    "GET_MAX_MEM_SLOTS",
    "ADD_MEM_REG",
    "REM_MEM_REG",
    "SET_STATUS",
    "GET_STATUS",
    "GET_SHARED_OBJECT",
    "SET_DEVICE_STATE_FD",
    "CHECK_DEVICE_STATE",
};

constexpr std::string_view kBackendRequestNames[] = {
    "BACKEND_NONE",
    "BACKEND_IOTLB_MSG",
    "BACKEND_CONFIG_CHANGE_MSG",
    "BACKEND_VRING_HOST_NOTIFIER_MSG",
    "BACKEND_VRING_CALL",
    "BACKEND_VRING_ERR",
    "BACKEND_SHARED_OBJECT_ADD",
    "BACKEND_SHARED_OBJECT_REMOVE",
    "BACKEND_SHARED_OBJECT_LOOKUP",
};

// Bytes -> wire struct. Callers have checked the size; memcpy because payload bytes carry no
// alignment guarantee.
template <WireStruct T>
T load(std::span<const std::uint8_t> p) noexcept {
  T v{};
  std::memcpy(&v, p.data(), sizeof(T));
  return v;
}

std::string name_of(std::uint32_t request, bool backend) {
  return std::string(backend ? to_string(static_cast<BackendRequest>(request))
                             : to_string(static_cast<Request>(request)));
}

// The common checks every decoder starts with; `name` goes into every error.
class Checker {
 public:
  Checker(std::string_view name, std::span<const std::uint8_t> payload, const FdList& fds)
      : name_(name), payload_(payload), fds_(fds) {}

  Result<> size(std::size_t want) const {
    if (payload_.size() != want) {
      return fail(Errc::invalid_argument,
                  fmt::format("{} payload is {} bytes, expected {}", name_, payload_.size(), want));
    }
    return {};
  }
  Result<> at_least(std::size_t want) const {
    if (payload_.size() < want) {
      return fail(Errc::invalid_argument,
                  fmt::format("{} payload is {} bytes, expected at least {}", name_,
                              payload_.size(), want));
    }
    return {};
  }
  Result<> fds(std::size_t want) const {
    if (fds_.size() != want) {
      return fail(fds_.size() > want ? Errc::too_many : Errc::invalid_argument,
                  fmt::format("{} carries {} fds, expected {}", name_, fds_.size(), want));
    }
    return {};
  }
  Result<> exact(std::size_t payload_size, std::size_t nfds) const {
    if (auto r = size(payload_size); !r) return r;
    return fds(nfds);
  }

  std::string_view name() const { return name_; }

 private:
  std::string_view name_;
  std::span<const std::uint8_t> payload_;
  const FdList& fds_;
};

memory::RegionSpec to_spec(const wire::MemoryRegion& r) noexcept {
  return {.guest_phys_addr = r.guest_phys_addr,
          .size = r.memory_size,
          .userspace_addr = r.userspace_addr,
          .mmap_offset = r.mmap_offset};
}

Inflight to_inflight(const wire::Inflight& w) noexcept {
  return {.mmap_size = w.mmap_size,
          .mmap_offset = w.mmap_offset,
          .num_queues = w.num_queues,
          .queue_size = w.queue_size};
}

Uuid to_uuid(const wire::Shared& w) noexcept {
  Uuid u;
  std::memcpy(u.data(), w.uuid, u.size());
  return u;
}

// ---- per-shape decoders, shared by front-end and back-end requests ------------------------

template <typename T>
Result<T> decode_none(const Checker& c) {
  if (auto r = c.exact(0, 0); !r) return std::unexpected(r.error());
  return T{};
}

template <typename T>
Result<T> decode_u64(const Checker& c, std::span<const std::uint8_t> p) {
  if (auto r = c.exact(sizeof(std::uint64_t), 0); !r) return std::unexpected(r.error());
  T m;
  m.value = load<std::uint64_t>(p);
  return m;
}

template <typename T>
Result<T> decode_state(const Checker& c, std::span<const std::uint8_t> p) {
  if (auto r = c.exact(sizeof(wire::VringState), 0); !r) return std::unexpected(r.error());
  auto w = load<wire::VringState>(p);
  T m;
  m.index = w.index;
  m.num = w.num;
  return m;
}

template <typename T>
Result<T> decode_vring_fd(const Checker& c, std::span<const std::uint8_t> p, FdList& fds) {
  if (auto r = c.size(sizeof(std::uint64_t)); !r) return std::unexpected(r.error());
  auto u = load<std::uint64_t>(p);
  if ((u & ~(kVringIndexMask | kVringNoFdMask)) != 0) {
    return fail(Errc::invalid_argument,
                fmt::format("{} payload {:#x} has bits set above bit 8", c.name(), u));
  }
  const bool nofd = (u & kVringNoFdMask) != 0;
  if (auto r = c.fds(nofd ? 0 : 1); !r) {
    if (!nofd && fds.empty()) {
      return fail(Errc::invalid_argument,
                  fmt::format("{} carries no fd and does not set the no-fd bit", c.name()));
    }
    return std::unexpected(r.error());
  }
  T m;
  m.index = static_cast<std::uint8_t>(u & kVringIndexMask);
  if (!nofd) m.fd = fds.take(0);
  return m;
}

template <typename T>
Result<T> decode_fd_only(const Checker& c, FdList& fds) {
  if (auto r = c.exact(0, 1); !r) return std::unexpected(r.error());
  T m;
  m.fd = fds.take(0);
  return m;
}

template <typename T>
Result<T> decode_iotlb(const Checker& c, std::span<const std::uint8_t> p) {
  if (auto r = c.exact(sizeof(wire::IotlbMsg), 0); !r) return std::unexpected(r.error());
  auto w = load<wire::IotlbMsg>(p);
  T m;
  m.iova = w.iova;
  m.size = w.size;
  m.uaddr = w.uaddr;
  m.perm = w.perm;
  m.type = w.type;
  return m;
}

template <typename T>
Result<T> decode_uuid(const Checker& c, std::span<const std::uint8_t> p) {
  if (auto r = c.exact(sizeof(wire::Shared), 0); !r) return std::unexpected(r.error());
  T m;
  m.uuid = to_uuid(load<wire::Shared>(p));
  return m;
}

Result<SetMemTable> decode_mem_table(const Checker& c, std::span<const std::uint8_t> p,
                                     FdList& fds) {
  if (auto r = c.at_least(wire::kMemoryHeaderSize); !r) return std::unexpected(r.error());
  const auto nregions = load<std::uint32_t>(p);
  if (nregions > kMaxMemRegions) {
    return fail(Errc::too_many,
                fmt::format("SET_MEM_TABLE has {} regions, at most {}", nregions, kMaxMemRegions));
  }
  if (auto r = c.size(wire::kMemoryHeaderSize + nregions * sizeof(wire::MemoryRegion)); !r) {
    return std::unexpected(r.error());
  }
  if (auto r = c.fds(nregions); !r) return std::unexpected(r.error());
  SetMemTable m;
  m.regions.reserve(nregions);
  for (std::size_t i = 0; i < nregions; ++i) {
    auto w = load<wire::MemoryRegion>(
        p.subspan(wire::kMemoryHeaderSize + i * sizeof(wire::MemoryRegion)));
    m.regions.push_back(MemRegion{to_spec(w), fds.take(i)});
  }
  return m;
}

// GET_CONFIG and SET_CONFIG: a 12-byte head whose size field must account for the rest.
Result<wire::Config> decode_config_space(const Checker& c, std::span<const std::uint8_t> p) {
  if (auto r = c.at_least(wire::kConfigHeaderSize); !r) return std::unexpected(r.error());
  wire::Config w{};
  std::memcpy(&w, p.data(), wire::kConfigHeaderSize);
  if (w.size > kMaxConfigSize) {
    return fail(Errc::out_of_range, fmt::format("{} config size {} is over the limit of {}",
                                                c.name(), w.size, kMaxConfigSize));
  }
  if (auto r = c.size(wire::kConfigHeaderSize + w.size); !r) return std::unexpected(r.error());
  std::memcpy(w.region, p.data() + wire::kConfigHeaderSize, w.size);
  return w;
}

Result<FrontendMessage> decode_request(Request req, const Checker& c,
                                       std::span<const std::uint8_t> p, FdList& fds) {
  auto lift = [](auto r) -> Result<FrontendMessage> {
    if (!r) return std::unexpected(std::move(r.error()));
    return FrontendMessage(std::move(*r));
  };
  switch (req) {
    case Request::get_features: return lift(decode_none<GetFeatures>(c));
    case Request::set_features: return lift(decode_u64<SetFeatures>(c, p));
    case Request::set_owner: return lift(decode_none<SetOwner>(c));
    case Request::reset_owner: return lift(decode_none<ResetOwner>(c));
    case Request::set_mem_table: return lift(decode_mem_table(c, p, fds));
    case Request::set_log_base: {
      if (auto r = c.exact(sizeof(wire::Log), 1); !r) return std::unexpected(r.error());
      auto w = load<wire::Log>(p);
      return SetLogBase{.mmap_size = w.mmap_size, .mmap_offset = w.mmap_offset, .fd = fds.take(0)};
    }
    case Request::set_log_fd: return lift(decode_fd_only<SetLogFd>(c, fds));
    case Request::set_vring_num: return lift(decode_state<SetVringNum>(c, p));
    case Request::set_vring_addr: {
      if (auto r = c.exact(sizeof(wire::VringAddr), 0); !r) return std::unexpected(r.error());
      auto w = load<wire::VringAddr>(p);
      return SetVringAddr{.index = w.index,
                          .flags = w.flags,
                          .desc_user_addr = w.desc_user_addr,
                          .used_user_addr = w.used_user_addr,
                          .avail_user_addr = w.avail_user_addr,
                          .log_guest_addr = w.log_guest_addr};
    }
    case Request::set_vring_base: return lift(decode_state<SetVringBase>(c, p));
    case Request::get_vring_base: return lift(decode_state<GetVringBase>(c, p));
    case Request::set_vring_kick: return lift(decode_vring_fd<SetVringKick>(c, p, fds));
    case Request::set_vring_call: return lift(decode_vring_fd<SetVringCall>(c, p, fds));
    case Request::set_vring_err: return lift(decode_vring_fd<SetVringErr>(c, p, fds));
    case Request::get_protocol_features: return lift(decode_none<GetProtocolFeatures>(c));
    case Request::set_protocol_features: return lift(decode_u64<SetProtocolFeatures>(c, p));
    case Request::get_queue_num: return lift(decode_none<GetQueueNum>(c));
    case Request::set_vring_enable: return lift(decode_state<SetVringEnable>(c, p));
    case Request::send_rarp: {
      if (auto r = c.exact(sizeof(std::uint64_t), 0); !r) return std::unexpected(r.error());
      SendRarp m;
      std::memcpy(m.mac.data(), p.data(), m.mac.size());  // the first 6 bytes of the u64
      return m;
    }
    case Request::net_set_mtu: return lift(decode_u64<NetSetMtu>(c, p));
    case Request::set_backend_req_fd: return lift(decode_fd_only<SetBackendReqFd>(c, fds));
    case Request::iotlb_msg: return lift(decode_iotlb<IotlbMsg>(c, p));
    case Request::set_vring_endian: return lift(decode_state<SetVringEndian>(c, p));
    case Request::get_config: {
      auto w = decode_config_space(c, p);
      if (!w) return std::unexpected(std::move(w.error()));
      if (auto r = c.fds(0); !r) return std::unexpected(r.error());
      return GetConfig{.offset = w->offset, .size = w->size, .flags = w->flags};
    }
    case Request::set_config: {
      auto w = decode_config_space(c, p);
      if (!w) return std::unexpected(std::move(w.error()));
      if (auto r = c.fds(0); !r) return std::unexpected(r.error());
      return SetConfig{.offset = w->offset,
                       .flags = w->flags,
                       .data = std::vector<std::uint8_t>(w->region, w->region + w->size)};
    }
    case Request::close_crypto_session: return lift(decode_u64<CloseCryptoSession>(c, p));
    case Request::postcopy_advise: return lift(decode_none<PostcopyAdvise>(c));
    case Request::postcopy_listen: return lift(decode_none<PostcopyListen>(c));
    case Request::postcopy_end: return lift(decode_none<PostcopyEnd>(c));
    case Request::get_inflight_fd: {
      if (auto r = c.exact(sizeof(wire::Inflight), 0); !r) return std::unexpected(r.error());
      return GetInflightFd{to_inflight(load<wire::Inflight>(p))};
    }
    case Request::set_inflight_fd: {
      if (auto r = c.exact(sizeof(wire::Inflight), 1); !r) return std::unexpected(r.error());
      return SetInflightFd{to_inflight(load<wire::Inflight>(p)), fds.take(0)};
    }
    case Request::gpu_set_socket: return lift(decode_fd_only<GpuSetSocket>(c, fds));
    case Request::reset_device: return lift(decode_none<ResetDevice>(c));
    case Request::vring_kick: return lift(decode_state<VringKick>(c, p));
    case Request::get_max_mem_slots: return lift(decode_none<GetMaxMemSlots>(c));
    case Request::add_mem_reg: {
      if (auto r = c.exact(sizeof(wire::SingleMemoryRegion), 1); !r) {
        return std::unexpected(r.error());
      }
      auto w = load<wire::SingleMemoryRegion>(p);
      return AddMemReg{MemRegion{to_spec(w.region), fds.take(0)}};
    }
    case Request::rem_mem_reg: {
      if (auto r = c.size(sizeof(wire::SingleMemoryRegion)); !r) return std::unexpected(r.error());
      // The spec lets a back-end tolerate one stray fd here; it is closed with `fds`.
      if (fds.size() > 1) {
        return fail(Errc::too_many,
                    fmt::format("REM_MEM_REG carries {} fds, expected 0 (or 1)", fds.size()));
      }
      return RemMemReg{to_spec(load<wire::SingleMemoryRegion>(p).region)};
    }
    case Request::set_status: return lift(decode_u64<SetStatus>(c, p));
    case Request::get_status: return lift(decode_none<GetStatus>(c));
    case Request::get_shared_object: return lift(decode_uuid<GetSharedObject>(c, p));
    case Request::set_device_state_fd: {
      if (auto r = c.exact(sizeof(wire::DeviceStateTransfer), 1); !r) {
        return std::unexpected(r.error());
      }
      auto w = load<wire::DeviceStateTransfer>(p);
      return SetDeviceStateFd{.direction = w.direction, .phase = w.phase, .fd = fds.take(0)};
    }
    case Request::check_device_state: return lift(decode_none<CheckDeviceState>(c));
    case Request::create_crypto_session:
      return fail(Errc::unsupported, "CREATE_CRYPTO_SESSION (request 26) is not supported");
    case Request::none: break;
  }
  return fail(Errc::unsupported,
              fmt::format("unknown request {}", static_cast<std::uint32_t>(req)));
}

Result<BackendMessage> decode_backend_request(BackendRequest req, const Checker& c,
                                              std::span<const std::uint8_t> p, FdList& fds) {
  auto lift = [](auto r) -> Result<BackendMessage> {
    if (!r) return std::unexpected(std::move(r.error()));
    return BackendMessage(std::move(*r));
  };
  switch (req) {
    case BackendRequest::iotlb_msg: return lift(decode_iotlb<BackendIotlbMsg>(c, p));
    case BackendRequest::config_change_msg: return lift(decode_none<BackendConfigChange>(c));
    case BackendRequest::vring_host_notifier_msg: {
      if (auto r = c.size(sizeof(wire::VringArea)); !r) return std::unexpected(r.error());
      auto w = load<wire::VringArea>(p);
      if ((w.u64 & ~(kVringIndexMask | kVringNoFdMask)) != 0) {
        return fail(Errc::invalid_argument,
                    fmt::format("{} u64 {:#x} has bits set above bit 8", c.name(), w.u64));
      }
      const bool nofd = (w.u64 & kVringNoFdMask) != 0;
      if (auto r = c.fds(nofd ? 0 : 1); !r) return std::unexpected(r.error());
      BackendVringHostNotifier m;
      m.index = static_cast<std::uint8_t>(w.u64 & kVringIndexMask);
      m.size = w.size;
      m.offset = w.offset;
      if (!nofd) m.fd = fds.take(0);
      return BackendMessage(std::move(m));
    }
    case BackendRequest::vring_call: return lift(decode_state<BackendVringCall>(c, p));
    case BackendRequest::vring_err: return lift(decode_state<BackendVringErr>(c, p));
    case BackendRequest::shared_object_add: return lift(decode_uuid<BackendSharedObjectAdd>(c, p));
    case BackendRequest::shared_object_remove:
      return lift(decode_uuid<BackendSharedObjectRemove>(c, p));
    case BackendRequest::shared_object_lookup:
      return lift(decode_uuid<BackendSharedObjectLookup>(c, p));
    case BackendRequest::none: break;
  }
  return fail(Errc::unsupported,
              fmt::format("unknown back-end request {}", static_cast<std::uint32_t>(req)));
}

// Header checks shared by requests of both directions.
Result<> check_request_header(const Header& h, std::span<const std::uint8_t> payload,
                              bool backend) {
  if (h.version() != kVersion) {
    return fail(Errc::invalid_argument,
                fmt::format("{} has version {} in its flags, expected {}",
                            name_of(h.request, backend), h.version(), kVersion));
  }
  if (h.reply()) {
    return fail(Errc::invalid_argument, fmt::format("{} is a request but has the REPLY flag set",
                                                    name_of(h.request, backend)));
  }
  if (h.size != payload.size()) {
    return fail(Errc::invalid_argument,
                fmt::format("{} header size {} does not match the {} payload bytes given",
                            name_of(h.request, backend), h.size, payload.size()));
  }
  return {};
}

Result<> check_reply_header(const Received& msg, std::uint32_t expected, bool backend) {
  const Header& h = msg.header;
  if (h.version() != kVersion) {
    return fail(Errc::invalid_argument,
                fmt::format("reply to {} has version {} in its flags, expected {}",
                            name_of(expected, backend), h.version(), kVersion));
  }
  if (!h.reply()) {
    return fail(Errc::invalid_argument,
                fmt::format("expected a reply to {}, got request {}", name_of(expected, backend),
                            name_of(h.request, backend)));
  }
  if (h.request != expected) {
    return fail(Errc::invalid_argument,
                fmt::format("expected a reply to {}, got a reply to {}", name_of(expected, backend),
                            name_of(h.request, backend)));
  }
  return {};
}

}  // namespace

// ---- public ------------------------------------------------------------------------------

bool FdList::push_back(UniqueFd fd) noexcept {
  if (count_ == fds_.size()) return false;  // `fd` closes as it goes out of scope
  fds_[count_++] = std::move(fd);
  return true;
}

void FdList::clear() noexcept {
  for (std::size_t i = 0; i < count_; ++i) fds_[i].reset();
  count_ = 0;
}

std::string_view to_string(Request r) noexcept {
  const auto n = static_cast<std::uint32_t>(r);
  if (n < std::size(kRequestNames)) return kRequestNames[n];
  return "unknown request";
}

std::string_view to_string(BackendRequest r) noexcept {
  const auto n = static_cast<std::uint32_t>(r);
  if (n < std::size(kBackendRequestNames)) return kBackendRequestNames[n];
  return "unknown back-end request";
}

Result<FrontendMessage> decode(const Header& header, std::span<const std::uint8_t> payload,
                               FdList fds) {
  if (auto r = check_request_header(header, payload, false); !r) return std::unexpected(r.error());
  const auto req = static_cast<Request>(header.request);
  Checker c(to_string(req), payload, fds);
  return decode_request(req, c, payload, fds);
}

namespace {
Error truncated_fds(std::string_view what) {
  return Error{Errc::too_many, 0,
               fmt::format("{} came with more than {} fds (control message truncated); all were "
                           "closed",
                           what, kMaxFds)};
}
}  // namespace

Result<FrontendMessage> decode(Received&& msg) {
  if (msg.fds_truncated) {
    return std::unexpected(truncated_fds(to_string(static_cast<Request>(msg.header.request))));
  }
  return decode(msg.header, msg.payload(), std::move(msg.fds));
}

Result<BackendMessage> decode_backend(const Header& header, std::span<const std::uint8_t> payload,
                                      FdList fds) {
  if (auto r = check_request_header(header, payload, true); !r) return std::unexpected(r.error());
  const auto req = static_cast<BackendRequest>(header.request);
  Checker c(to_string(req), payload, fds);
  return decode_backend_request(req, c, payload, fds);
}

Result<BackendMessage> decode_backend(Received&& msg) {
  if (msg.fds_truncated) {
    return std::unexpected(
        truncated_fds(to_string(static_cast<BackendRequest>(msg.header.request))));
  }
  return decode_backend(msg.header, msg.payload(), std::move(msg.fds));
}

Request request_of(const FrontendMessage& m) noexcept {
  return std::visit([](const auto& v) { return v.kRequest; }, m);
}

BackendRequest request_of(const BackendMessage& m) noexcept {
  return std::visit([](const auto& v) { return v.kRequest; }, m);
}

namespace {
Result<std::uint64_t> u64_reply(const Received& msg, std::uint32_t expected, bool backend) {
  if (auto r = check_reply_header(msg, expected, backend); !r) return std::unexpected(r.error());
  auto name = fmt::format("reply to {}", name_of(expected, backend));
  Checker c(name, msg.payload(), msg.fds);
  if (auto r = c.exact(sizeof(std::uint64_t), 0); !r) return std::unexpected(r.error());
  return load<std::uint64_t>(msg.payload());
}
}  // namespace

Result<std::uint64_t> decode_u64_reply(const Received& msg, Request expected) {
  return u64_reply(msg, static_cast<std::uint32_t>(expected), false);
}

Result<std::uint64_t> decode_u64_reply(const Received& msg, BackendRequest expected) {
  return u64_reply(msg, static_cast<std::uint32_t>(expected), true);
}

Result<VringState> decode_vring_state_reply(const Received& msg, Request expected) {
  const auto want = static_cast<std::uint32_t>(expected);
  if (auto r = check_reply_header(msg, want, false); !r) return std::unexpected(r.error());
  auto name = fmt::format("reply to {}", to_string(expected));
  Checker c(name, msg.payload(), msg.fds);
  if (auto r = c.exact(sizeof(wire::VringState), 0); !r) return std::unexpected(r.error());
  auto w = load<wire::VringState>(msg.payload());
  return VringState{w.index, w.num};
}

Result<ConfigReply> decode_config_reply(const Received& msg) {
  const auto want = static_cast<std::uint32_t>(Request::get_config);
  if (auto r = check_reply_header(msg, want, false); !r) return std::unexpected(r.error());
  Checker c("reply to GET_CONFIG", msg.payload(), msg.fds);
  if (auto r = c.fds(0); !r) return std::unexpected(r.error());
  if (msg.header.size == 0) return ConfigReply{};  // the back-end's way of saying "failed"
  auto w = decode_config_space(c, msg.payload());
  if (!w) return std::unexpected(std::move(w.error()));
  return ConfigReply{w->offset, w->flags,
                     std::vector<std::uint8_t>(w->region, w->region + w->size)};
}

Result<InflightReply> decode_inflight_reply(Received&& msg) {
  FdList fds = std::move(msg.fds);
  const auto want = static_cast<std::uint32_t>(Request::get_inflight_fd);
  if (auto r = check_reply_header(msg, want, false); !r) return std::unexpected(r.error());
  Checker c("reply to GET_INFLIGHT_FD", msg.payload(), fds);
  if (auto r = c.exact(sizeof(wire::Inflight), 1); !r) return std::unexpected(r.error());
  return InflightReply{to_inflight(load<wire::Inflight>(msg.payload())), fds.take(0)};
}

}  // namespace vhostkit::vhost_user
