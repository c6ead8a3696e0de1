// Feature bits from the virtio 1.2 specification (and the vhost-user additions that live in the
// same 64-bit word).
#pragma once

#include <cstdint>

namespace vhostkit::virtio {

constexpr std::uint64_t bit(unsigned n) { return std::uint64_t{1} << n; }

// Device-independent (virtio 1.2, 6 "Reserved Feature Bits").
namespace feature {
inline constexpr unsigned notify_on_empty = 24;
inline constexpr unsigned log_all = 26;  // VHOST_F_LOG_ALL: dirty logging for migration
inline constexpr unsigned any_layout = 27;
inline constexpr unsigned ring_indirect_desc = 28;
inline constexpr unsigned ring_event_idx = 29;
inline constexpr unsigned protocol_features = 30;  // VHOST_USER_F_PROTOCOL_FEATURES
inline constexpr unsigned version_1 = 32;
inline constexpr unsigned access_platform = 33;
inline constexpr unsigned ring_packed = 34;
inline constexpr unsigned in_order = 35;
inline constexpr unsigned order_platform = 36;
inline constexpr unsigned sr_iov = 37;
inline constexpr unsigned notification_data = 38;
inline constexpr unsigned notif_config_data = 39;
inline constexpr unsigned ring_reset = 40;
}  // namespace feature

// virtio-net (virtio 1.2, 5.1.3).
namespace net_feature {
inline constexpr unsigned csum = 0;
inline constexpr unsigned guest_csum = 1;
inline constexpr unsigned ctrl_guest_offloads = 2;
inline constexpr unsigned mtu = 3;
inline constexpr unsigned mac = 5;
inline constexpr unsigned guest_tso4 = 7;
inline constexpr unsigned guest_tso6 = 8;
inline constexpr unsigned guest_ecn = 9;
inline constexpr unsigned guest_ufo = 10;
inline constexpr unsigned host_tso4 = 11;
inline constexpr unsigned host_tso6 = 12;
inline constexpr unsigned host_ecn = 13;
inline constexpr unsigned host_ufo = 14;
inline constexpr unsigned mrg_rxbuf = 15;
inline constexpr unsigned status = 16;
inline constexpr unsigned ctrl_vq = 17;
inline constexpr unsigned ctrl_rx = 18;
inline constexpr unsigned ctrl_vlan = 19;
inline constexpr unsigned ctrl_rx_extra = 20;
inline constexpr unsigned guest_announce = 21;
inline constexpr unsigned mq = 22;
inline constexpr unsigned ctrl_mac_addr = 23;
inline constexpr unsigned notf_coal = 53;
inline constexpr unsigned guest_uso4 = 54;
inline constexpr unsigned guest_uso6 = 55;
inline constexpr unsigned host_uso = 56;
inline constexpr unsigned hash_report = 57;
inline constexpr unsigned guest_hdrlen = 59;
inline constexpr unsigned rss = 60;
inline constexpr unsigned rsc_ext = 61;
inline constexpr unsigned standby = 62;
inline constexpr unsigned speed_duplex = 63;
}  // namespace net_feature

// virtio-blk (virtio 1.2, 5.2.3).
namespace blk_feature {
inline constexpr unsigned size_max = 1;
inline constexpr unsigned seg_max = 2;
inline constexpr unsigned geometry = 4;
inline constexpr unsigned ro = 5;
inline constexpr unsigned blk_size = 6;
inline constexpr unsigned flush = 9;
inline constexpr unsigned topology = 10;
inline constexpr unsigned config_wce = 11;
inline constexpr unsigned mq = 12;
inline constexpr unsigned discard = 13;
inline constexpr unsigned write_zeroes = 14;
inline constexpr unsigned lifetime = 15;
inline constexpr unsigned secure_erase = 16;
}  // namespace blk_feature

// Device status field (virtio 1.2, 2.1).
namespace status {
inline constexpr std::uint8_t acknowledge = 1;
inline constexpr std::uint8_t driver = 2;
inline constexpr std::uint8_t driver_ok = 4;
inline constexpr std::uint8_t features_ok = 8;
inline constexpr std::uint8_t device_needs_reset = 64;
inline constexpr std::uint8_t failed = 128;
}  // namespace status

constexpr bool has(std::uint64_t features, unsigned n) { return (features & bit(n)) != 0; }

}  // namespace vhostkit::virtio
