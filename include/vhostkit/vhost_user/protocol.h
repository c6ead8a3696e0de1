// The vhost-user wire format (QEMU docs/interop/vhost-user.rst): request numbers, flag bits,
// protocol feature bits and the payload structs exactly as they travel over the socket, in the
// machine's native byte order. Only the codec (message.cc) and the channel (channel.cc) read or
// write these; everything above them uses the typed messages of message.h.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace vhostkit::vhost_user {

// Requests the front-end sends to the back-end on the main socket.
enum class Request : std::uint32_t {
  none = 0,
  get_features = 1,
  set_features = 2,
  set_owner = 3,
  reset_owner = 4,
  set_mem_table = 5,
  set_log_base = 6,
  set_log_fd = 7,
  set_vring_num = 8,
  set_vring_addr = 9,
  set_vring_base = 10,
  get_vring_base = 11,
  set_vring_kick = 12,
  set_vring_call = 13,
  set_vring_err = 14,
  get_protocol_features = 15,
  set_protocol_features = 16,
  get_queue_num = 17,
  set_vring_enable = 18,
  send_rarp = 19,
  net_set_mtu = 20,
  set_backend_req_fd = 21,  // formerly SET_SLAVE_REQ_FD
  iotlb_msg = 22,
  set_vring_endian = 23,
  get_config = 24,
  set_config = 25,
  create_crypto_session = 26,
  close_crypto_session = 27,
  postcopy_advise = 28,
  postcopy_listen = 29,
  postcopy_end = 30,
  get_inflight_fd = 31,
  set_inflight_fd = 32,
  gpu_set_socket = 33,
  reset_device = 34,
  vring_kick = 35,
  get_max_mem_slots = 36,
  add_mem_reg = 37,
  rem_mem_reg = 38,
  set_status = 39,
  get_status = 40,
  get_shared_object = 41,
  set_device_state_fd = 42,
  check_device_state = 43,
};

// Requests the back-end sends to the front-end on the back-end channel (SET_BACKEND_REQ_FD).
enum class BackendRequest : std::uint32_t {
  none = 0,
  iotlb_msg = 1,
  config_change_msg = 2,
  vring_host_notifier_msg = 3,
  vring_call = 4,
  vring_err = 5,
  shared_object_add = 6,
  shared_object_remove = 7,
  shared_object_lookup = 8,
};

// "SET_VRING_NUM"; "unknown request" ("unknown back-end request") for a number the spec does
// not define.
std::string_view to_string(Request r) noexcept;
std::string_view to_string(BackendRequest r) noexcept;

// What the back-end owes the front-end after a request, beyond REPLY_ACK.
enum class ReplyRule : std::uint8_t {
  ack,                // nothing of its own: a REPLY_ACK when NEED_REPLY asks (and it is negotiated)
  body,               // a reply with a body of its own, always: the front-end waits for it even
                      // when the request failed
  body_if_log_shmfd,  // SET_LOG_BASE: a u64 reply once LOG_SHMFD is negotiated, else as `ack`
};
// From the same request table as to_string() and decode(); `ack` for an unknown number.
ReplyRule reply_rule(Request r) noexcept;

// Header flags.
inline constexpr std::uint32_t kVersionMask = 0x3;
inline constexpr std::uint32_t kVersion = 0x1;
inline constexpr std::uint32_t kReplyFlag = 1u << 2;
inline constexpr std::uint32_t kNeedReplyFlag = 1u << 3;

// The u64 of SET_VRING_KICK / CALL / ERR: vring index in bits 0-7, "no fd" in bit 8.
inline constexpr std::uint64_t kVringIndexMask = 0xff;
inline constexpr std::uint64_t kVringNoFdMask = std::uint64_t{1} << 8;

// Limits.
inline constexpr std::size_t kMaxMemRegions = 8;  // VHOST_MEMORY_BASELINE_NREGIONS
inline constexpr std::size_t kMaxFds = 8;         // fds per message, either direction
inline constexpr std::size_t kMaxConfigSize = 256;

// VHOST_USER_PROTOCOL_F_* bit numbers.
namespace protocol_feature {
inline constexpr unsigned mq = 0;
inline constexpr unsigned log_shmfd = 1;
inline constexpr unsigned rarp = 2;
inline constexpr unsigned reply_ack = 3;
inline constexpr unsigned net_mtu = 4;
inline constexpr unsigned backend_req = 5;  // formerly SLAVE_REQ
inline constexpr unsigned cross_endian = 6;
inline constexpr unsigned crypto_session = 7;
inline constexpr unsigned pagefault = 8;
inline constexpr unsigned config = 9;
inline constexpr unsigned backend_send_fd = 10;  // formerly SLAVE_SEND_FD
inline constexpr unsigned host_notifier = 11;
inline constexpr unsigned inflight_shmfd = 12;
inline constexpr unsigned reset_device = 13;
inline constexpr unsigned inband_notifications = 14;
inline constexpr unsigned configure_mem_slots = 15;
inline constexpr unsigned status = 16;
inline constexpr unsigned xen_mmap = 17;
inline constexpr unsigned shared_object = 18;
inline constexpr unsigned device_state = 19;
}  // namespace protocol_feature

// Every message starts with this header; `size` bytes of payload follow.
struct Header {
  std::uint32_t request = 0;
  std::uint32_t flags = kVersion;
  std::uint32_t size = 0;

  std::uint32_t version() const noexcept { return flags & kVersionMask; }
  bool reply() const noexcept { return (flags & kReplyFlag) != 0; }
  bool need_reply() const noexcept { return (flags & kNeedReplyFlag) != 0; }
};

// Payload layouts. Plain C layout: QEMU packs only the header, the union members keep their
// natural alignment, so sizeof() below is exactly what goes on the wire.
namespace wire {

struct VringState {  // struct vhost_vring_state
  std::uint32_t index;
  std::uint32_t num;
};

struct VringAddr {  // struct vhost_vring_addr
  std::uint32_t index;
  std::uint32_t flags;  // virtio::kVhostVringFLog
  std::uint64_t desc_user_addr;
  std::uint64_t used_user_addr;
  std::uint64_t avail_user_addr;
  std::uint64_t log_guest_addr;
};

struct MemoryRegion {
  std::uint64_t guest_phys_addr;
  std::uint64_t memory_size;
  std::uint64_t userspace_addr;
  std::uint64_t mmap_offset;
};

// SET_MEM_TABLE: only nregions entries are sent.
struct Memory {
  std::uint32_t nregions;
  std::uint32_t padding;
  MemoryRegion regions[kMaxMemRegions];
};
inline constexpr std::size_t kMemoryHeaderSize = 8;

// ADD_MEM_REG / REM_MEM_REG.
struct SingleMemoryRegion {
  std::uint64_t padding;
  MemoryRegion region;
};

struct Log {  // SET_LOG_BASE
  std::uint64_t mmap_size;
  std::uint64_t mmap_offset;
};

struct IotlbMsg {  // struct vhost_iotlb_msg
  std::uint64_t iova;
  std::uint64_t size;
  std::uint64_t uaddr;
  std::uint8_t perm;
  std::uint8_t type;
  std::uint8_t reserved[6];
};

// GET_CONFIG / SET_CONFIG: `size` bytes of config space follow the 12-byte head.
struct Config {
  std::uint32_t offset;
  std::uint32_t size;
  std::uint32_t flags;
  std::uint8_t region[kMaxConfigSize];
};
inline constexpr std::size_t kConfigHeaderSize = 12;
inline constexpr std::uint32_t kConfigFlagWritable = 0;
inline constexpr std::uint32_t kConfigFlagLiveMigration = 1;

struct VringArea {    // BACKEND_VRING_HOST_NOTIFIER_MSG
  std::uint64_t u64;  // vring index in bits 0-7, bit 8 "no fd"
  std::uint64_t size;
  std::uint64_t offset;
};

struct Inflight {  // GET_INFLIGHT_FD / SET_INFLIGHT_FD
  std::uint64_t mmap_size;
  std::uint64_t mmap_offset;
  std::uint16_t num_queues;
  std::uint16_t queue_size;
  std::uint8_t padding[4];
};

struct Shared {  // GET_SHARED_OBJECT, BACKEND_SHARED_OBJECT_*
  std::uint8_t uuid[16];
};

struct DeviceStateTransfer {  // SET_DEVICE_STATE_FD
  std::uint32_t direction;    // 0 save, 1 load
  std::uint32_t phase;        // 0 stopped
};

}  // namespace wire

static_assert(sizeof(Header) == 12);
static_assert(sizeof(wire::VringState) == 8);
static_assert(sizeof(wire::VringAddr) == 40);
static_assert(sizeof(wire::MemoryRegion) == 32);
static_assert(sizeof(wire::Memory) == wire::kMemoryHeaderSize + kMaxMemRegions * 32);
static_assert(offsetof(wire::Memory, regions) == wire::kMemoryHeaderSize);
static_assert(sizeof(wire::SingleMemoryRegion) == 40);
static_assert(sizeof(wire::Log) == 16);
static_assert(sizeof(wire::IotlbMsg) == 32);
static_assert(offsetof(wire::IotlbMsg, perm) == 24 && offsetof(wire::IotlbMsg, type) == 25);
static_assert(sizeof(wire::Config) == wire::kConfigHeaderSize + kMaxConfigSize);
static_assert(offsetof(wire::Config, region) == wire::kConfigHeaderSize);
static_assert(sizeof(wire::VringArea) == 24);
static_assert(sizeof(wire::Inflight) == 24);
static_assert(offsetof(wire::Inflight, queue_size) == 18);
static_assert(sizeof(wire::Shared) == 16);
static_assert(sizeof(wire::DeviceStateTransfer) == 8);

// The largest payload any defined message carries (GET/SET_CONFIG with 256 bytes of config
// space; the full memory table is 264). A header announcing more can't be a legal message, and
// since the stream can't be resynchronised past it, the channel treats it as a broken peer.
inline constexpr std::size_t kMaxPayloadSize =
    std::max({sizeof(wire::Memory), sizeof(wire::Config), sizeof(wire::VringAddr),
              sizeof(wire::IotlbMsg), sizeof(wire::Inflight), sizeof(wire::SingleMemoryRegion)});
static_assert(kMaxPayloadSize == 268);

template <typename T>
concept WireStruct = std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>;

}  // namespace vhostkit::vhost_user
