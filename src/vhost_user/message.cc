// The vhost-user codec: the only code that reads or writes payload bytes.
#include "vhostkit/vhost_user/message.h"

#include <fmt/format.h>

#include <cstring>
#include <utility>

namespace vhostkit::vhost_user {

namespace {

// How many fds a request must carry. Checked after the payload, so a message wrong in both is
// reported for its payload.
enum class FdRule : std::uint8_t {
  none,         // no fd
  one,          // exactly one
  optional,     // none, or one that is closed unused (REM_MEM_REG: the spec lets a back-end
                // tolerate a sloppy front-end's fd)
  per_region,   // one per region the payload lists (SET_MEM_TABLE)
  unless_nofd,  // one, or none when the payload's u64 sets the no-fd bit (bit 8)
};

// One message on its way in: its payload bytes, the fds that came with it (only counted here;
// the decoder moves them) and the name every error starts with.
class Input {
 public:
  Input(std::string_view name, std::span<const std::uint8_t> payload, const FdList& fds)
      : name_(name), payload_(payload), fds_(fds) {}

  std::string_view name() const { return name_; }
  std::span<const std::uint8_t> bytes() const { return payload_; }
  // Bytes -> wire struct. Callers have checked the size; memcpy because payload bytes carry no
  // alignment guarantee.
  template <WireStruct T>
  T load(std::size_t offset = 0) const noexcept {
    T v{};
    std::memcpy(&v, payload_.data() + offset, sizeof(T));
    return v;
  }

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

  // For the rules whose count the payload decides (per_region, unless_nofd).
  void list_fds(std::size_t n) noexcept { listed_ = n; }
  Result<> fds(FdRule rule) const;

 private:
  std::string_view name_;
  std::span<const std::uint8_t> payload_;
  const FdList& fds_;
  std::size_t listed_ = 0;
};

Result<> Input::fds(FdRule rule) const {
  switch (rule) {
    case FdRule::none: return fds(0);
    case FdRule::one: return fds(1);
    case FdRule::per_region: return fds(listed_);
    case FdRule::optional:
      if (fds_.size() > 1) {
        return fail(Errc::too_many,
                    fmt::format("{} carries {} fds, expected 0 (or 1)", name_, fds_.size()));
      }
      return {};
    case FdRule::unless_nofd:
      if (listed_ == 1 && fds_.empty()) {
        return fail(Errc::invalid_argument,
                    fmt::format("{} carries no fd and does not set the no-fd bit", name_));
      }
      return fds(listed_);
  }
  return fail(Errc::invalid_argument, "bad fd rule");  // unreachable: the switch is exhaustive
}

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

// ---- payload parsers, one per message shape -----------------------------------------------
// parse(m, in) checks the payload's size and fills every field of `m` but its fds; a rule whose
// fd count the payload decides learns it through in.list_fds().

template <auto R>
Result<> parse(NoPayload<R>&, Input& in) {
  return in.size(0);
}

template <auto R>
Result<> parse(FdPayload<R>&, Input& in) {
  return in.size(0);
}

template <auto R>
Result<> parse(U64Payload<R>& m, Input& in) {
  if (auto r = in.size(sizeof(std::uint64_t)); !r) return r;
  m.value = in.load<std::uint64_t>();
  return {};
}

template <auto R>
Result<> parse(VringStatePayload<R>& m, Input& in) {
  if (auto r = in.size(sizeof(wire::VringState)); !r) return r;
  const auto w = in.load<wire::VringState>();
  m.index = w.index;
  m.num = w.num;
  return {};
}

// The u64 naming a vring and maybe the no-fd bit (SET_VRING_KICK/CALL/ERR, a host notifier's
// VringArea); `what` names the field in the error.
Result<std::uint8_t> parse_vring_u64(Input& in, std::uint64_t u, std::string_view what) {
  if ((u & ~(kVringIndexMask | kVringNoFdMask)) != 0) {
    return fail(Errc::invalid_argument,
                fmt::format("{} {} {:#x} has bits set above bit 8", in.name(), what, u));
  }
  in.list_fds((u & kVringNoFdMask) != 0 ? 0 : 1);
  return static_cast<std::uint8_t>(u & kVringIndexMask);
}

template <auto R>
Result<> parse(VringFdPayload<R>& m, Input& in) {
  if (auto r = in.size(sizeof(std::uint64_t)); !r) return r;
  auto index = parse_vring_u64(in, in.load<std::uint64_t>(), "payload");
  if (!index) return std::unexpected(std::move(index.error()));
  m.index = *index;
  return {};
}

Result<> parse(BackendVringHostNotifier& m, Input& in) {
  if (auto r = in.size(sizeof(wire::VringArea)); !r) return r;
  const auto w = in.load<wire::VringArea>();
  auto index = parse_vring_u64(in, w.u64, "u64");
  if (!index) return std::unexpected(std::move(index.error()));
  m.index = *index;
  m.size = w.size;
  m.offset = w.offset;
  return {};
}

Result<> parse(Iotlb& m, Input& in) {  // IOTLB_MSG in either direction
  if (auto r = in.size(sizeof(wire::IotlbMsg)); !r) return r;
  const auto w = in.load<wire::IotlbMsg>();
  m.iova = w.iova;
  m.size = w.size;
  m.uaddr = w.uaddr;
  m.perm = w.perm;
  m.type = w.type;
  return {};
}

Result<> parse_uuid(Uuid& u, Input& in) {
  if (auto r = in.size(sizeof(wire::Shared)); !r) return r;
  std::memcpy(u.data(), in.load<wire::Shared>().uuid, u.size());
  return {};
}

template <auto R>
Result<> parse(UuidPayload<R>& m, Input& in) {
  return parse_uuid(m.uuid, in);
}

Result<> parse(GetSharedObject& m, Input& in) { return parse_uuid(m.uuid, in); }

Result<> parse(SetMemTable& m, Input& in) {
  if (auto r = in.at_least(wire::kMemoryHeaderSize); !r) return r;
  const auto nregions = in.load<std::uint32_t>();
  if (nregions > kMaxMemRegions) {
    return fail(Errc::too_many,
                fmt::format("{} has {} regions, at most {}", in.name(), nregions, kMaxMemRegions));
  }
  if (auto r = in.size(wire::kMemoryHeaderSize + nregions * sizeof(wire::MemoryRegion)); !r) {
    return r;
  }
  in.list_fds(nregions);
  m.regions.reserve(nregions);
  for (std::size_t i = 0; i < nregions; ++i) {
    const auto w =
        in.load<wire::MemoryRegion>(wire::kMemoryHeaderSize + i * sizeof(wire::MemoryRegion));
    m.regions.push_back(memory::RegionFd{to_spec(w), UniqueFd{}});
  }
  return {};
}

Result<> parse(SetLogBase& m, Input& in) {
  if (auto r = in.size(sizeof(wire::Log)); !r) return r;
  const auto w = in.load<wire::Log>();
  m.mmap_size = w.mmap_size;
  m.mmap_offset = w.mmap_offset;
  return {};
}

Result<> parse(SetVringAddr& m, Input& in) {
  if (auto r = in.size(sizeof(wire::VringAddr)); !r) return r;
  const auto w = in.load<wire::VringAddr>();
  m = SetVringAddr{.index = w.index,
                   .addr = {.flags = w.flags,
                            .desc_user_addr = w.desc_user_addr,
                            .used_user_addr = w.used_user_addr,
                            .avail_user_addr = w.avail_user_addr,
                            .log_guest_addr = w.log_guest_addr}};
  return {};
}

Result<> parse(SendRarp& m, Input& in) {
  if (auto r = in.size(sizeof(std::uint64_t)); !r) return r;
  std::memcpy(m.mac.data(), in.bytes().data(), m.mac.size());  // the first 6 bytes of the u64
  return {};
}

// GET_CONFIG, SET_CONFIG and the reply to GET_CONFIG: a 12-byte head whose size field must
// account for the rest.
Result<wire::Config> parse_config_space(const Input& in) {
  if (auto r = in.at_least(wire::kConfigHeaderSize); !r) return std::unexpected(r.error());
  wire::Config w{};
  std::memcpy(&w, in.bytes().data(), wire::kConfigHeaderSize);
  if (w.size > kMaxConfigSize) {
    return fail(Errc::out_of_range, fmt::format("{} config size {} is over the limit of {}",
                                                in.name(), w.size, kMaxConfigSize));
  }
  if (auto r = in.size(wire::kConfigHeaderSize + w.size); !r) return std::unexpected(r.error());
  std::memcpy(w.region, in.bytes().data() + wire::kConfigHeaderSize, w.size);
  return w;
}

// A request for, or a write of, no config space at all is refused here; a reply of size 0 is
// how a back-end reports a failed GET_CONFIG, so parse_config_space admits it.
Result<> no_config_space(const Input& in, const wire::Config& w) {
  if (w.size != 0) return {};
  return fail(Errc::invalid_argument,
              fmt::format("{} config size 0 is not in 1..{}", in.name(), kMaxConfigSize));
}

Result<> parse(GetConfig& m, Input& in) {
  auto w = parse_config_space(in);
  if (!w) return std::unexpected(std::move(w.error()));
  if (auto r = no_config_space(in, *w); !r) return r;
  m = GetConfig{.offset = w->offset, .size = w->size, .flags = w->flags};
  return {};
}

Result<> parse(SetConfig& m, Input& in) {
  auto w = parse_config_space(in);
  if (!w) return std::unexpected(std::move(w.error()));
  if (auto r = no_config_space(in, *w); !r) return r;
  m.offset = w->offset;
  m.flags = w->flags;
  m.data.assign(w->region, w->region + w->size);
  return {};
}

Result<> parse_inflight(Inflight& i, Input& in) {
  if (auto r = in.size(sizeof(wire::Inflight)); !r) return r;
  i = to_inflight(in.load<wire::Inflight>());
  return {};
}

Result<> parse(GetInflightFd& m, Input& in) { return parse_inflight(m.inflight, in); }
Result<> parse(SetInflightFd& m, Input& in) { return parse_inflight(m.inflight, in); }

Result<> parse(AddMemReg& m, Input& in) {
  if (auto r = in.size(sizeof(wire::SingleMemoryRegion)); !r) return r;
  m.region.spec = to_spec(in.load<wire::SingleMemoryRegion>().region);
  return {};
}

Result<> parse(RemMemReg& m, Input& in) {
  if (auto r = in.size(sizeof(wire::SingleMemoryRegion)); !r) return r;
  m.spec = to_spec(in.load<wire::SingleMemoryRegion>().region);
  return {};
}

Result<> parse(SetDeviceStateFd& m, Input& in) {
  if (auto r = in.size(sizeof(wire::DeviceStateTransfer)); !r) return r;
  const auto w = in.load<wire::DeviceStateTransfer>();
  m.direction = w.direction;
  m.phase = w.phase;
  return {};
}

// ---- fds: once the row's rule admitted them, into the message ----------------------------
// An fd the message has no place for (the stray one REM_MEM_REG may carry) closes with the
// FdList.

template <typename T>
void attach(T& m, FdList& fds) noexcept {
  if constexpr (requires { m.fd; }) {
    if (!fds.empty()) m.fd = fds.take(0);
  }
}

void attach(SetMemTable& m, FdList& fds) noexcept {
  for (std::size_t i = 0; i < m.regions.size(); ++i) m.regions[i].fd = fds.take(i);
}

void attach(AddMemReg& m, FdList& fds) noexcept { m.region.fd = fds.take(0); }

template <typename T>
constexpr bool kHoldsFds =
    requires(T m) { m.fd; } || std::same_as<T, SetMemTable> || std::same_as<T, AddMemReg>;

// Parse, check the fds by the row's rule, then move them in: every message the same way.
template <typename T, typename Row>
Result<typename Row::Message> decode_as(const Row& row, Input& in, FdList& fds) {
  T m;
  if (auto r = parse(m, in); !r) return std::unexpected(std::move(r.error()));
  if (auto r = in.fds(row.fds); !r) return std::unexpected(std::move(r.error()));
  attach(m, fds);
  return typename Row::Message(std::move(m));
}

// ---- the request tables ------------------------------------------------------------------
// One row per request number, at the index of its number (static_asserts below): the name,
// the fd rule and the decoder, and for front-end requests the reply rule. to_string(), decode()
// and reply_rule() all read these rows and nothing else.

struct FrontendRow {
  using Message = FrontendMessage;
  static constexpr std::string_view kUnknown = "unknown request";
  Request request;
  std::string_view name;
  FdRule fds;
  ReplyRule reply;
  Result<Message> (*decode)(const FrontendRow&, Input&, FdList&);
};

struct BackendRow {
  using Message = BackendMessage;
  static constexpr std::string_view kUnknown = "unknown back-end request";
  BackendRequest request;
  std::string_view name;
  FdRule fds;
  Result<Message> (*decode)(const BackendRow&, Input&, FdList&);
};

template <typename Row>
Result<typename Row::Message> unknown(std::uint32_t request) {
  return fail(Errc::unsupported, fmt::format("{} {}", Row::kUnknown, request));
}

template <typename Row>
Result<typename Row::Message> reject_unknown(const Row& row, Input&, FdList&) {
  return unknown<Row>(std::to_underlying(row.request));
}

template <typename Row>
Result<typename Row::Message> reject_unsupported(const Row& row, Input&, FdList&) {
  return fail(Errc::unsupported, fmt::format("{} (request {}) is not supported", row.name,
                                             std::to_underlying(row.request)));
}

// A row whose number comes from the message type itself, so a row can't decode into another
// request's type; an fd rule the type has no place for (or a type with an fd and no rule for
// it) does not compile.
template <typename T>
consteval void check_fd_rule(FdRule fds) {
  const bool takes_fds = fds != FdRule::none && fds != FdRule::optional;
  if (takes_fds != kHoldsFds<T>) throw "the fd rule does not fit the message type";
}

template <typename T>
consteval FrontendRow request_row(std::string_view name, FdRule fds,
                                  ReplyRule reply = ReplyRule::ack) {
  check_fd_rule<T>(fds);
  return {T::kRequest, name, fds, reply, &decode_as<T, FrontendRow>};
}

template <typename T>
consteval BackendRow backend_row(std::string_view name, FdRule fds) {
  check_fd_rule<T>(fds);
  return {T::kRequest, name, fds, &decode_as<T, BackendRow>};
}

constexpr FrontendRow kRequests[] = {
    {Request::none, "NONE", FdRule::none, ReplyRule::ack, &reject_unknown<FrontendRow>},
    request_row<GetFeatures>("GET_FEATURES", FdRule::none, ReplyRule::body),
    request_row<SetFeatures>("SET_FEATURES", FdRule::none),
    request_row<SetOwner>("SET_OWNER", FdRule::none),
    request_row<ResetOwner>("RESET_OWNER", FdRule::none),
    request_row<SetMemTable>("SET_MEM_TABLE", FdRule::per_region),
    request_row<SetLogBase>("SET_LOG_BASE", FdRule::one, ReplyRule::body_if_log_shmfd),
    request_row<SetLogFd>("SET_LOG_FD", FdRule::one),
    request_row<SetVringNum>("SET_VRING_NUM", FdRule::none),
    request_row<SetVringAddr>("SET_VRING_ADDR", FdRule::none),
    request_row<SetVringBase>("SET_VRING_BASE", FdRule::none),
    request_row<GetVringBase>("GET_VRING_BASE", FdRule::none, ReplyRule::body),
    request_row<SetVringKick>("SET_VRING_KICK", FdRule::unless_nofd),
    request_row<SetVringCall>("SET_VRING_CALL", FdRule::unless_nofd),
    request_row<SetVringErr>("SET_VRING_ERR", FdRule::unless_nofd),
    request_row<GetProtocolFeatures>("GET_PROTOCOL_FEATURES", FdRule::none, ReplyRule::body),
    request_row<SetProtocolFeatures>("SET_PROTOCOL_FEATURES", FdRule::none),
    request_row<GetQueueNum>("GET_QUEUE_NUM", FdRule::none, ReplyRule::body),
    request_row<SetVringEnable>("SET_VRING_ENABLE", FdRule::none),
    request_row<SendRarp>("SEND_RARP", FdRule::none),
    request_row<NetSetMtu>("NET_SET_MTU", FdRule::none),
    request_row<SetBackendReqFd>("SET_BACKEND_REQ_FD", FdRule::one),
    request_row<IotlbMsg>("IOTLB_MSG", FdRule::none, ReplyRule::body),
    request_row<SetVringEndian>("SET_VRING_ENDIAN", FdRule::none),
    request_row<GetConfig>("GET_CONFIG", FdRule::none, ReplyRule::body),
    request_row<SetConfig>("SET_CONFIG", FdRule::none),
    {Request::create_crypto_session, "CREATE_CRYPTO_SESSION", FdRule::none, ReplyRule::body,
     &reject_unsupported<FrontendRow>},
    request_row<CloseCryptoSession>("CLOSE_CRYPTO_SESSION", FdRule::none),
    request_row<PostcopyAdvise>("POSTCOPY_ADVISE", FdRule::none, ReplyRule::body),
    request_row<PostcopyListen>("POSTCOPY_LISTEN", FdRule::none),
    request_row<PostcopyEnd>("POSTCOPY_END", FdRule::none, ReplyRule::body),
    request_row<GetInflightFd>("GET_INFLIGHT_FD", FdRule::none, ReplyRule::body),
    request_row<SetInflightFd>("SET_INFLIGHT_FD", FdRule::one),
    request_row<GpuSetSocket>("GPU_SET_SOCKET", FdRule::one),
    request_row<ResetDevice>("RESET_DEVICE", FdRule::none),
    request_row<VringKick>("VRING_KICK", FdRule::none),
    request_row<GetMaxMemSlots>("GET_MAX_MEM_SLOTS", FdRule::none, ReplyRule::body),
    request_row<AddMemReg>("ADD_MEM_REG", FdRule::one),
    request_row<RemMemReg>("REM_MEM_REG", FdRule::optional),
    request_row<SetStatus>("SET_STATUS", FdRule::none),
    request_row<GetStatus>("GET_STATUS", FdRule::none, ReplyRule::body),
    request_row<GetSharedObject>("GET_SHARED_OBJECT", FdRule::none, ReplyRule::body),
    request_row<SetDeviceStateFd>("SET_DEVICE_STATE_FD", FdRule::one, ReplyRule::body),
    request_row<CheckDeviceState>("CHECK_DEVICE_STATE", FdRule::none, ReplyRule::body),
};

constexpr BackendRow kBackendRequests[] = {
    {BackendRequest::none, "BACKEND_NONE", FdRule::none, &reject_unknown<BackendRow>},
    backend_row<BackendIotlbMsg>("BACKEND_IOTLB_MSG", FdRule::none),
    backend_row<BackendConfigChange>("BACKEND_CONFIG_CHANGE_MSG", FdRule::none),
    backend_row<BackendVringHostNotifier>("BACKEND_VRING_HOST_NOTIFIER_MSG", FdRule::unless_nofd),
    backend_row<BackendVringCall>("BACKEND_VRING_CALL", FdRule::none),
    backend_row<BackendVringErr>("BACKEND_VRING_ERR", FdRule::none),
    backend_row<BackendSharedObjectAdd>("BACKEND_SHARED_OBJECT_ADD", FdRule::none),
    backend_row<BackendSharedObjectRemove>("BACKEND_SHARED_OBJECT_REMOVE", FdRule::none),
    backend_row<BackendSharedObjectLookup>("BACKEND_SHARED_OBJECT_LOOKUP", FdRule::none),
};

// Row i is request i: every number from 0 to the last one defined has exactly one row, and a
// lookup is an index.
template <typename Row, std::size_t N>
consteval bool rows_in_order(const Row (&table)[N]) {
  for (std::size_t i = 0; i < N; ++i) {
    if (std::to_underlying(table[i].request) != i) return false;
  }
  return true;
}

// Every message type of the variant is decoded by its own request's row.
template <typename Row, std::size_t N, typename... Ts>
consteval bool every_message_has_its_row(const Row (&table)[N], std::variant<Ts...>*) {
  return ((std::to_underlying(Ts::kRequest) < N &&
           table[std::to_underlying(Ts::kRequest)].decode == &decode_as<Ts, Row>) &&
          ...);
}

static_assert(rows_in_order(kRequests));
static_assert(std::size(kRequests) == std::to_underlying(Request::check_device_state) + 1);
static_assert(every_message_has_its_row(kRequests, static_cast<FrontendMessage*>(nullptr)));
static_assert(rows_in_order(kBackendRequests));
static_assert(std::size(kBackendRequests) ==
              std::to_underlying(BackendRequest::shared_object_lookup) + 1);
static_assert(every_message_has_its_row(kBackendRequests, static_cast<BackendMessage*>(nullptr)));

template <typename Row, std::size_t N>
const Row* find(const Row (&table)[N], std::uint32_t request) noexcept {
  return request < N ? &table[request] : nullptr;
}

template <typename Row, std::size_t N>
std::string_view name_in(const Row (&table)[N], std::uint32_t request) noexcept {
  const Row* row = find(table, request);
  return row ? row->name : Row::kUnknown;
}

std::string name_of(std::uint32_t request, bool backend) {
  return std::string(backend ? name_in(kBackendRequests, request) : name_in(kRequests, request));
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

// A request of either direction: its row, then the row's decoder.
template <typename Row, std::size_t N>
Result<typename Row::Message> decode_request(const Row (&table)[N], const Header& header,
                                             std::span<const std::uint8_t> payload, FdList& fds) {
  const Row* row = find(table, header.request);
  if (row == nullptr) return unknown<Row>(header.request);
  Input in(row->name, payload, fds);
  return row->decode(*row, in, fds);
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

std::string_view to_string(Request r) noexcept { return name_in(kRequests, std::to_underlying(r)); }

std::string_view to_string(BackendRequest r) noexcept {
  return name_in(kBackendRequests, std::to_underlying(r));
}

ReplyRule reply_rule(Request r) noexcept {
  const FrontendRow* row = find(kRequests, std::to_underlying(r));
  return row ? row->reply : ReplyRule::ack;
}

Result<FrontendMessage> decode(const Header& header, std::span<const std::uint8_t> payload,
                               FdList fds) {
  if (auto r = check_request_header(header, payload, false); !r) return std::unexpected(r.error());
  return decode_request(kRequests, header, payload, fds);
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
  return decode_request(kBackendRequests, header, payload, fds);
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
  Input in(name, msg.payload(), msg.fds);
  if (auto r = in.exact(sizeof(std::uint64_t), 0); !r) return std::unexpected(r.error());
  return in.load<std::uint64_t>();
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
  Input in(name, msg.payload(), msg.fds);
  if (auto r = in.exact(sizeof(wire::VringState), 0); !r) return std::unexpected(r.error());
  const auto w = in.load<wire::VringState>();
  return VringState{w.index, w.num};
}

Result<ConfigReply> decode_config_reply(const Received& msg) {
  const auto want = static_cast<std::uint32_t>(Request::get_config);
  if (auto r = check_reply_header(msg, want, false); !r) return std::unexpected(r.error());
  Input in("reply to GET_CONFIG", msg.payload(), msg.fds);
  if (auto r = in.fds(0); !r) return std::unexpected(r.error());
  if (msg.header.size == 0) return ConfigReply{};  // the back-end's way of saying "failed"
  auto w = parse_config_space(in);
  if (!w) return std::unexpected(std::move(w.error()));
  return ConfigReply{w->offset, w->flags,
                     std::vector<std::uint8_t>(w->region, w->region + w->size)};
}

Result<InflightReply> decode_inflight_reply(Received&& msg) {
  FdList fds = std::move(msg.fds);
  const auto want = static_cast<std::uint32_t>(Request::get_inflight_fd);
  if (auto r = check_reply_header(msg, want, false); !r) return std::unexpected(r.error());
  Input in("reply to GET_INFLIGHT_FD", msg.payload(), fds);
  if (auto r = in.size(sizeof(wire::Inflight)); !r) return std::unexpected(r.error());
  const Inflight inflight = to_inflight(in.load<wire::Inflight>());
  // mmap_size 0 is a back-end keeping no region (QEMU accepts it so): then no fd.
  if (auto r = in.fds(inflight.mmap_size == 0 ? 0 : 1); !r) return std::unexpected(r.error());
  return InflightReply{inflight, inflight.mmap_size == 0 ? UniqueFd{} : fds.take(0)};
}

}  // namespace vhostkit::vhost_user
