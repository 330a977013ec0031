package notifier

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"syscall"
)

// guard is the dialer's Control hook: it refuses loopback, link-local,
// private and unspecified addresses unless allow-listed (SSRF guard). It runs
// on the resolved address, so DNS rebinding cannot slip past it.
func (o *Outbox) guard(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return err
	}
	ip = ip.Unmap()
	if !(ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast()) {
		return nil
	}
	for _, a := range o.cfg.AllowHosts {
		if a == "localhost" && ip.IsLoopback() {
			return nil
		}
		if p, err := netip.ParsePrefix(a); err == nil && p.Contains(ip) {
			return nil
		}
		if p, err := netip.ParseAddr(a); err == nil && p.Unmap() == ip {
			return nil
		}
	}
	return fmt.Errorf("refusing to send a webhook to %s: loopback, link-local and private addresses need rules.notify.allow_hosts (SSRF guard)", ip)
}

// checkHost refuses, at start-up, a receiver whose host resolves to an
// address the guard would refuse (the dialer checks again on every connect).
func (o *Outbox) checkHost(r ReceiverConfig) error {
	u, _ := url.Parse(r.URL)
	host := u.Hostname()
	for _, a := range o.cfg.AllowHosts {
		if a == host {
			return nil
		}
	}
	addrs, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", host)
	if err != nil {
		o.log.Warn("notify: cannot resolve a receiver now; it is checked again on every delivery", "receiver", r.Name, "err", err)
		return nil
	}
	for _, ip := range addrs {
		if err := o.guard("tcp", net.JoinHostPort(ip.String(), "0"), nil); err != nil {
			return fmt.Errorf("rules.notify receiver %s (%s): %w", r.Name, r.URL, err)
		}
	}
	return nil
}
