// Typed vhost-user messages and the codec between them and the wire.
//
// Decoding is the one place where peer bytes become values: decode() checks the version bits,
// the exact payload size of each request (bounded sizes for the variable ones), and the number of
// file descriptors each request carries, and returns a validated typed message or an Error that
// says what was wrong. File descriptors are owned (UniqueFd) from the moment they are received:
// any fd a message should not carry, and every fd on an error path, is closed by the codec.
//
// What the codec does NOT check: anything that needs state (is this vring index in range, was
// the feature negotiated, do the regions overlap). That is the session's and the device's job.
//
// Encoding turns a typed message (or a reply) into an OutMessage: header + payload bytes +
// borrowed fds, ready for Channel::send(). Encoding never takes ownership of fds.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::vhost_user {

// Up to kMaxFds owned file descriptors, in the order they arrived. No allocation.
class FdList {
 public:
  FdList() = default;
  FdList(FdList&&) noexcept = default;
  FdList& operator=(FdList&&) noexcept = default;

  // Appends; when full the fd is closed and false returned.
  bool push_back(UniqueFd fd) noexcept;
  std::size_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  int operator[](std::size_t i) const noexcept { return fds_[i].get(); }
  // Moves fd i out (the slot keeps an invalid fd; size() is unchanged).
  UniqueFd take(std::size_t i) noexcept { return std::move(fds_[i]); }
  void clear() noexcept;

 private:
  std::array<UniqueFd, kMaxFds> fds_;
  std::size_t count_ = 0;
};

// ---- Front-end requests (front-end -> back-end) ------------------------------------------
// Every message type has `static constexpr ... kRequest`, its request number. Those without an
// fd compare with == (field by field); those with one do not, as two fds naming one file are
// still two numbers.

template <auto R>
struct NoPayload {
  static constexpr auto kRequest = R;
  bool operator==(const NoPayload&) const = default;
};

template <auto R>
struct U64Payload {
  static constexpr auto kRequest = R;
  std::uint64_t value = 0;
  bool operator==(const U64Payload&) const = default;
};

template <auto R>
struct VringStatePayload {
  static constexpr auto kRequest = R;
  std::uint32_t index = 0;
  std::uint32_t num = 0;
  bool operator==(const VringStatePayload&) const = default;
};

// SET_VRING_KICK / CALL / ERR. `fd` is invalid when the front-end set the "no fd" bit (bit 8):
// for KICK that means "poll the ring", for CALL "don't signal".
template <auto R>
struct VringFdPayload {
  static constexpr auto kRequest = R;
  std::uint8_t index = 0;
  UniqueFd fd;
  bool nofd() const noexcept { return !fd.valid(); }
};

// A request whose whole content is one fd (and no payload).
template <auto R>
struct FdPayload {
  static constexpr auto kRequest = R;
  UniqueFd fd;
};

using GetFeatures = NoPayload<Request::get_features>;
using SetFeatures = U64Payload<Request::set_features>;
using SetOwner = NoPayload<Request::set_owner>;
using ResetOwner = NoPayload<Request::reset_owner>;
using SetLogFd = FdPayload<Request::set_log_fd>;
using SetVringNum = VringStatePayload<Request::set_vring_num>;
using SetVringBase = VringStatePayload<Request::set_vring_base>;
using GetVringBase = VringStatePayload<Request::get_vring_base>;
using SetVringKick = VringFdPayload<Request::set_vring_kick>;
using SetVringCall = VringFdPayload<Request::set_vring_call>;
using SetVringErr = VringFdPayload<Request::set_vring_err>;
using GetProtocolFeatures = NoPayload<Request::get_protocol_features>;
using SetProtocolFeatures = U64Payload<Request::set_protocol_features>;
using GetQueueNum = NoPayload<Request::get_queue_num>;
using SetVringEnable = VringStatePayload<Request::set_vring_enable>;  // num: 1 enable, 0 disable
using NetSetMtu = U64Payload<Request::net_set_mtu>;
using SetBackendReqFd = FdPayload<Request::set_backend_req_fd>;
using SetVringEndian = VringStatePayload<Request::set_vring_endian>;  // num: 0 LE, 1 BE
using CloseCryptoSession = U64Payload<Request::close_crypto_session>;
using PostcopyAdvise = NoPayload<Request::postcopy_advise>;
using PostcopyListen = NoPayload<Request::postcopy_listen>;
using PostcopyEnd = NoPayload<Request::postcopy_end>;
using GpuSetSocket = FdPayload<Request::gpu_set_socket>;
using ResetDevice = NoPayload<Request::reset_device>;
using VringKick = VringStatePayload<Request::vring_kick>;  // in-band kick; num reserved (0)
using GetMaxMemSlots = NoPayload<Request::get_max_mem_slots>;
using SetStatus = U64Payload<Request::set_status>;
using GetStatus = NoPayload<Request::get_status>;
using CheckDeviceState = NoPayload<Request::check_device_state>;

struct SetMemTable {
  static constexpr auto kRequest = Request::set_mem_table;
  std::vector<memory::RegionFd> regions;  // 0..kMaxMemRegions, one fd each
};

struct SetLogBase {
  static constexpr auto kRequest = Request::set_log_base;
  std::uint64_t mmap_size = 0;
  std::uint64_t mmap_offset = 0;
  UniqueFd fd;
};

struct SetVringAddr {
  static constexpr auto kRequest = Request::set_vring_addr;
  std::uint32_t index = 0;
  memory::VringAddr addr;
  bool operator==(const SetVringAddr&) const = default;
};

struct SendRarp {
  static constexpr auto kRequest = Request::send_rarp;
  std::array<std::uint8_t, 6> mac{};
  bool operator==(const SendRarp&) const = default;
};

struct Iotlb {
  std::uint64_t iova = 0;
  std::uint64_t size = 0;
  std::uint64_t uaddr = 0;
  std::uint8_t perm = 0;  // 0 none, 1 read, 2 write, 3 read/write
  std::uint8_t type = 0;  // 1 miss, 2 update, 3 invalidate, 4 access fail
  bool operator==(const Iotlb&) const = default;
};

struct IotlbMsg : Iotlb {
  static constexpr auto kRequest = Request::iotlb_msg;
};

// GET_CONFIG asks for `size` bytes at `offset`; its payload bytes carry nothing.
struct GetConfig {
  static constexpr auto kRequest = Request::get_config;
  std::uint32_t offset = 0;
  std::uint32_t size = 0;  // <= kMaxConfigSize
  std::uint32_t flags = 0;
  bool operator==(const GetConfig&) const = default;
};

struct SetConfig {
  static constexpr auto kRequest = Request::set_config;
  std::uint32_t offset = 0;
  std::uint32_t flags = 0;         // wire::kConfigFlagWritable or kConfigFlagLiveMigration
  std::vector<std::uint8_t> data;  // <= kMaxConfigSize bytes
  bool operator==(const SetConfig&) const = default;
};

struct Inflight {
  std::uint64_t mmap_size = 0;
  std::uint64_t mmap_offset = 0;
  std::uint16_t num_queues = 0;
  std::uint16_t queue_size = 0;
  bool operator==(const Inflight&) const = default;
};

struct GetInflightFd {
  static constexpr auto kRequest = Request::get_inflight_fd;
  Inflight inflight;
  bool operator==(const GetInflightFd&) const = default;
};

struct SetInflightFd {
  static constexpr auto kRequest = Request::set_inflight_fd;
  Inflight inflight;
  UniqueFd fd;
};

struct AddMemReg {
  static constexpr auto kRequest = Request::add_mem_reg;
  memory::RegionFd region;
};

// Identified by guest address, user address and size; mmap_offset is ignored. An fd sent by a
// sloppy front-end (the spec allows accepting one) is closed by the codec.
struct RemMemReg {
  static constexpr auto kRequest = Request::rem_mem_reg;
  memory::RegionSpec spec;
};

using Uuid = std::array<std::uint8_t, 16>;

struct GetSharedObject {
  static constexpr auto kRequest = Request::get_shared_object;
  Uuid uuid{};
  bool operator==(const GetSharedObject&) const = default;
};

struct SetDeviceStateFd {
  static constexpr auto kRequest = Request::set_device_state_fd;
  std::uint32_t direction = 0;  // 0 save, 1 load
  std::uint32_t phase = 0;      // 0 stopped
  UniqueFd fd;
};

using FrontendMessage =
    std::variant<GetFeatures, SetFeatures, SetOwner, ResetOwner, SetMemTable, SetLogBase, SetLogFd,
                 SetVringNum, SetVringAddr, SetVringBase, GetVringBase, SetVringKick, SetVringCall,
                 SetVringErr, GetProtocolFeatures, SetProtocolFeatures, GetQueueNum, SetVringEnable,
                 SendRarp, NetSetMtu, SetBackendReqFd, IotlbMsg, SetVringEndian, GetConfig,
                 SetConfig, CloseCryptoSession, PostcopyAdvise, PostcopyListen, PostcopyEnd,
                 GetInflightFd, SetInflightFd, GpuSetSocket, ResetDevice, VringKick, GetMaxMemSlots,
                 AddMemReg, RemMemReg, SetStatus, GetStatus, GetSharedObject, SetDeviceStateFd,
                 CheckDeviceState>;

// ---- Back-end requests (back-end -> front-end, on the back-end channel) ------------------

struct BackendIotlbMsg : Iotlb {
  static constexpr auto kRequest = BackendRequest::iotlb_msg;
};
using BackendConfigChange = NoPayload<BackendRequest::config_change_msg>;

// Host notifier for a vring; `fd` invalid (bit 8 set) removes the current one.
struct BackendVringHostNotifier {
  static constexpr auto kRequest = BackendRequest::vring_host_notifier_msg;
  std::uint8_t index = 0;
  std::uint64_t size = 0;
  std::uint64_t offset = 0;
  UniqueFd fd;
};
using BackendVringCall = VringStatePayload<BackendRequest::vring_call>;
using BackendVringErr = VringStatePayload<BackendRequest::vring_err>;

template <auto R>
struct UuidPayload {
  static constexpr auto kRequest = R;
  Uuid uuid{};
  bool operator==(const UuidPayload&) const = default;
};
using BackendSharedObjectAdd = UuidPayload<BackendRequest::shared_object_add>;
using BackendSharedObjectRemove = UuidPayload<BackendRequest::shared_object_remove>;
using BackendSharedObjectLookup = UuidPayload<BackendRequest::shared_object_lookup>;

using BackendMessage = std::variant<BackendIotlbMsg, BackendConfigChange, BackendVringHostNotifier,
                                    BackendVringCall, BackendVringErr, BackendSharedObjectAdd,
                                    BackendSharedObjectRemove, BackendSharedObjectLookup>;

// ---- Decoding ---------------------------------------------------------------------------

// A whole message as read from the socket (Channel::recv fills it).
struct Received {
  Header header;
  std::array<std::uint8_t, kMaxPayloadSize> payload_buf{};
  FdList fds;
  // More fds came than kMaxFds (or the control message was truncated): every one that arrived
  // was closed, `fds` is empty, and decode refuses the message (Errc::too_many) with its header
  // known, so a NEED_REPLY request can still be answered.
  bool fds_truncated = false;

  std::span<const std::uint8_t> payload() const noexcept {
    return {payload_buf.data(), header.size <= kMaxPayloadSize ? header.size : 0};
  }
};

// A front-end request. Rejects: version != 1, the REPLY flag, unknown or unsupported request
// numbers (Errc::unsupported, naming the number), wrong payload size, wrong fd count. Takes the
// fds in every case; those not moved into the result are closed.
Result<FrontendMessage> decode(const Header& header, std::span<const std::uint8_t> payload,
                               FdList fds);
Result<FrontendMessage> decode(Received&& msg);

// A back-end request, same rules.
Result<BackendMessage> decode_backend(const Header& header, std::span<const std::uint8_t> payload,
                                      FdList fds);
Result<BackendMessage> decode_backend(Received&& msg);

Request request_of(const FrontendMessage& m) noexcept;
BackendRequest request_of(const BackendMessage& m) noexcept;

// Replies, decoded by the side that sent `expected`: the REPLY flag must be set, the request
// number must match, the size must be exact, and no fds may be attached (they are closed).
// A u64 reply: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
// GET_STATUS, POSTCOPY_END, CHECK_DEVICE_STATE, IOTLB_MSG, and every REPLY_ACK (0 = success).
Result<std::uint64_t> decode_u64_reply(const Received& msg, Request expected);
Result<std::uint64_t> decode_u64_reply(const Received& msg, BackendRequest expected);

struct VringState {
  std::uint32_t index = 0;
  std::uint32_t num = 0;
};
// GET_VRING_BASE.
Result<VringState> decode_vring_state_reply(const Received& msg, Request expected);

struct ConfigReply {
  std::uint32_t offset = 0;
  std::uint32_t flags = 0;
  std::vector<std::uint8_t> data;  // empty: the back-end reported an error
};
Result<ConfigReply> decode_config_reply(const Received& msg);

struct InflightReply {
  Inflight inflight;
  UniqueFd fd;
};
// GET_INFLIGHT_FD: exactly one fd, or none with mmap_size 0 (the back-end keeps no region).
Result<InflightReply> decode_inflight_reply(Received&& msg);

// ---- Encoding ---------------------------------------------------------------------------

// A message ready to send: the fds are borrowed from whoever owns them and must stay open
// until Channel::send() returns.
struct OutMessage {
  Header header;
  std::array<std::uint8_t, kMaxPayloadSize> payload_buf{};
  std::array<int, kMaxFds> fd_buf{};
  std::size_t fd_count = 0;

  std::span<const std::uint8_t> payload() const noexcept {
    return {payload_buf.data(), header.size};
  }
  std::span<const int> fds() const noexcept { return {fd_buf.data(), fd_count}; }
};

template <typename T, typename Variant>
struct is_alternative;
template <typename T, typename... Ts>
struct is_alternative<T, std::variant<Ts...>> : std::bool_constant<(std::is_same_v<T, Ts> || ...)> {
};

template <typename T>
concept Encodable =
    is_alternative<T, FrontendMessage>::value || is_alternative<T, BackendMessage>::value;

// A request; `flags` may add kNeedReplyFlag (the version bits are always set). A message that
// can't be encoded as given (more than 8 regions, config data over 256 bytes) yields an Error.
template <Encodable T>
Result<OutMessage> encode(const T& msg, std::uint32_t flags = 0);

// The same for a message held in a variant. A template so that a plain message never converts
// (and tries to copy itself) into a variant during overload resolution.
template <typename V>
  requires std::same_as<V, FrontendMessage> || std::same_as<V, BackendMessage>
Result<OutMessage> encode(const V& msg, std::uint32_t flags = 0) {
  return std::visit([flags](const auto& m) { return encode<std::decay_t<decltype(m)>>(m, flags); },
                    msg);
}

// Replies (REPLY flag set). REPLY_ACK is reply_u64(request, 0) for success, non-zero for failure.
OutMessage reply_u64(Request request, std::uint64_t value);
OutMessage reply_u64(BackendRequest request, std::uint64_t value);
OutMessage reply_ack(Request request, bool ok);
OutMessage reply_vring_state(Request request, std::uint32_t index, std::uint32_t num);
// GET_CONFIG; an empty `data` tells the front-end the request failed. At most 256 bytes are sent.
OutMessage reply_config(std::uint32_t offset, std::uint32_t flags,
                        std::span<const std::uint8_t> data);
// GET_INFLIGHT_FD; `fd` is borrowed.
OutMessage reply_inflight(const Inflight& inflight, int fd);

}  // namespace vhostkit::vhost_user
