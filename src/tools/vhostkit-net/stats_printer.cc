#include "stats_printer.h"

#include <vector>

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
      rate(a.rx_bytes, b.rx_bytes) * 8 / 1e9, b.rx_drops - a.rx_drops,
      b.rx_errors - a.rx_errors);
}

StatsPrinter::StatsPrinter(const net::NetDevice& dev, std::chrono::milliseconds interval,
                           std::function<void(const std::string&)> emit)
    : dev_(dev), interval_(interval), emit_(std::move(emit)), thread_([this] { run(); }) {}

StatsPrinter::~StatsPrinter() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void StatsPrinter::run() {
  std::vector<net::NetStats> prev(dev_.queue_pairs());
  for (std::uint16_t qp = 0; qp < prev.size(); ++qp) prev[qp] = dev_.stats(qp);
  auto last = std::chrono::steady_clock::now();
  std::unique_lock lk(mu_);
  while (!cv_.wait_for(lk, interval_, [this] { return stop_; })) {
    auto now = std::chrono::steady_clock::now();
    double secs = std::chrono::duration<double>(now - last).count();
    last = now;
    for (std::uint16_t qp = 0; qp < prev.size(); ++qp) {
      auto cur = dev_.stats(qp);
      emit_(format_pair_line(qp, prev[qp], cur, secs));
      prev[qp] = cur;
    }
  }
}

}  // namespace vhostkit::cli
