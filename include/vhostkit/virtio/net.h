// virtio-net wire structures (virtio 1.2, 5.1).
#pragma once

#include <cstddef>
#include <cstdint>

namespace vhostkit::virtio {

// VIRTIO_NET_F_MTU: the MTU a device may report (virtio 1.2, 5.1.4.1: at least 68) and the
// largest its 16-bit config field holds.
inline constexpr std::uint16_t kNetMinMtu = 68;
inline constexpr std::uint16_t kNetMaxMtu = 65535;

// virtio_net_hdr flags.
inline constexpr std::uint8_t kNetHdrFNeedsCsum = 1;
inline constexpr std::uint8_t kNetHdrFDataValid = 2;
inline constexpr std::uint8_t kNetHdrFRscInfo = 4;

// virtio_net_hdr gso_type.
inline constexpr std::uint8_t kNetHdrGsoNone = 0;
inline constexpr std::uint8_t kNetHdrGsoTcpv4 = 1;
inline constexpr std::uint8_t kNetHdrGsoUdp = 3;
inline constexpr std::uint8_t kNetHdrGsoTcpv6 = 4;
inline constexpr std::uint8_t kNetHdrGsoUdpL4 = 5;
inline constexpr std::uint8_t kNetHdrGsoEcn = 0x80;

// The legacy header without num_buffers (10 bytes): used when neither VERSION_1 nor MRG_RXBUF
// is negotiated.
struct VirtioNetHdr {
  std::uint8_t flags;
  std::uint8_t gso_type;
  std::uint16_t hdr_len;
  std::uint16_t gso_size;
  std::uint16_t csum_start;
  std::uint16_t csum_offset;
};
static_assert(sizeof(VirtioNetHdr) == 10);
static_assert(offsetof(VirtioNetHdr, hdr_len) == 2);
static_assert(offsetof(VirtioNetHdr, gso_size) == 4);
static_assert(offsetof(VirtioNetHdr, csum_start) == 6);
static_assert(offsetof(VirtioNetHdr, csum_offset) == 8);

// With VERSION_1 or MRG_RXBUF the header always carries num_buffers (12 bytes).
struct VirtioNetHdrMrg {
  VirtioNetHdr hdr;
  std::uint16_t num_buffers;
};
static_assert(sizeof(VirtioNetHdrMrg) == 12);
static_assert(offsetof(VirtioNetHdrMrg, num_buffers) == 10);

// Size of the header that precedes every packet, given the negotiated features.
constexpr std::size_t net_hdr_size(bool version_1, bool mrg_rxbuf) {
  return (version_1 || mrg_rxbuf) ? sizeof(VirtioNetHdrMrg) : sizeof(VirtioNetHdr);
}

// virtio_net_config.status
inline constexpr std::uint16_t kNetSLinkUp = 1;
inline constexpr std::uint16_t kNetSAnnounce = 2;

#pragma pack(push, 1)
struct VirtioNetConfig {
  std::uint8_t mac[6];
  std::uint16_t status;
  std::uint16_t max_virtqueue_pairs;
  std::uint16_t mtu;
  std::uint32_t speed;
  std::uint8_t duplex;
  std::uint8_t rss_max_key_size;
  std::uint16_t rss_max_indirection_table_length;
  std::uint32_t supported_hash_types;
};
#pragma pack(pop)
static_assert(sizeof(VirtioNetConfig) == 24);
static_assert(offsetof(VirtioNetConfig, status) == 6);
static_assert(offsetof(VirtioNetConfig, max_virtqueue_pairs) == 8);
static_assert(offsetof(VirtioNetConfig, mtu) == 10);
static_assert(offsetof(VirtioNetConfig, speed) == 12);
static_assert(offsetof(VirtioNetConfig, duplex) == 16);

// Control virtqueue (5.1.6.5): a header, command-specific data, then a one-byte ack the device
// writes.
struct VirtioNetCtrlHdr {
  std::uint8_t class_;
  std::uint8_t cmd;
};
static_assert(sizeof(VirtioNetCtrlHdr) == 2);

inline constexpr std::uint8_t kNetCtrlOk = 0;
inline constexpr std::uint8_t kNetCtrlErr = 1;

namespace net_ctrl {
inline constexpr std::uint8_t rx = 0;
inline constexpr std::uint8_t rx_promisc = 0;
inline constexpr std::uint8_t rx_allmulti = 1;
inline constexpr std::uint8_t rx_alluni = 2;
inline constexpr std::uint8_t rx_nomulti = 3;
inline constexpr std::uint8_t rx_nouni = 4;
inline constexpr std::uint8_t rx_nobcast = 5;
inline constexpr std::uint8_t mac = 1;
inline constexpr std::uint8_t mac_table_set = 0;
inline constexpr std::uint8_t mac_addr_set = 1;
inline constexpr std::uint8_t vlan = 2;
inline constexpr std::uint8_t vlan_add = 0;
inline constexpr std::uint8_t vlan_del = 1;
inline constexpr std::uint8_t announce = 3;
inline constexpr std::uint8_t announce_ack = 0;
inline constexpr std::uint8_t mq = 4;
inline constexpr std::uint8_t mq_vq_pairs_set = 0;
inline constexpr std::uint8_t mq_rss_config = 1;
inline constexpr std::uint8_t mq_hash_config = 2;
inline constexpr std::uint8_t guest_offloads = 5;
inline constexpr std::uint8_t guest_offloads_set = 0;
inline constexpr std::uint16_t mq_pairs_min = 1;
inline constexpr std::uint16_t mq_pairs_max = 0x8000;
}  // namespace net_ctrl

}  // namespace vhostkit::virtio
