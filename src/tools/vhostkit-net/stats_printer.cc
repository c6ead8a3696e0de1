#include "stats_printer.h"

#include <fmt/format.h>

namespace vhostkit::cli {

std::string format_pair_line(std::uint16_t qp, const net::NetStats& a, const net::NetStats& b,
                             double s) {
  if (s <= 0) s = 1;
  auto rate = [s](std::uint64_t x, std::uint64_t y) { return static_cast<double>(y - x) / s; };
  // Gbit/s counts frame bytes only (no virtio-net header, no Ethernet preamble or gap).
  return fmt::format(
      "qp{} tx {:8.3f} Mpps {:7.3f} Gbit/s drops {} err {} | rx {:8.3f} Mpps {:7.3f} Gbit/s "
      "drops {} err {}",
      qp, rate(a.tx_frames, b.tx_frames) / 1e6, rate(a.tx_bytes, b.tx_bytes) * 8 / 1e9,
      b.tx_drops - a.tx_drops, b.tx_errors - a.tx_errors, rate(a.rx_frames, b.rx_frames) / 1e6,
      rate(a.rx_bytes, b.rx_bytes) * 8 / 1e9, b.rx_drops - a.rx_drops, b.rx_errors - a.rx_errors);
}

std::string format_pair_totals(std::uint16_t qp, const net::NetStats& t) {
  return fmt::format(
      "qp{} tx {} frames {} bytes drops {} err {} | rx {} frames {} bytes drops {} "
      "err {}",
      qp, t.tx_frames, t.tx_bytes, t.tx_drops, t.tx_errors, t.rx_frames, t.rx_bytes, t.rx_drops,
      t.rx_errors);
}

StatsPrinter::StatsPrinter(const net::NetDevice& dev, std::chrono::milliseconds interval,
                           std::function<void(const std::string&)> emit)
    : dev_(dev),
      emit_(std::move(emit)),
      prev_(init(dev)),
      ticker_(interval, [this](double s) { tick(s); }) {}

std::vector<net::NetStats> StatsPrinter::init(const net::NetDevice& dev) {
  std::vector<net::NetStats> v(dev.queue_pairs());
  for (std::uint16_t qp = 0; qp < v.size(); ++qp) v[qp] = dev.stats(qp);
  return v;
}

void StatsPrinter::tick(double seconds) {
  for (std::uint16_t qp = 0; qp < prev_.size(); ++qp) {
    const auto cur = dev_.stats(qp);
    emit_(format_pair_line(qp, prev_[qp], cur, seconds));
    prev_[qp] = cur;
  }
}

}  // namespace vhostkit::cli
