package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// runStandby is `citypulse standby <action>`: it asks the node named by the
// config's http.addr (or --url) to activate, promote, salvage or demote its
// site (POST /api/v1/cluster/<action>, with http.admin_token) and prints the
// answer. The node does the work: it holds the site's NATS connection.
func runStandby(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return errors.New("usage: citypulse standby <activate|promote|salvage|demote> [--peer-down] [--discard-tail] [--config FILE] [--url http://node:8080]")
	}
	action := args[0]
	fs := flag.NewFlagSet("citypulse standby "+action, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "configs/citypulse.yaml", "the node's config file (http.addr, http.admin_token)")
	base := fs.String("url", "", "the node's HTTP API (default: from http.addr)")
	peerDown := fs.Bool("peer-down", false, "promote: state that the other site is down or cut off from every device (it cannot be fenced)")
	discard := fs.Bool("discard-tail", false, "demote: delete this site's unreplicated tail")
	timeout := fs.Duration("timeout", 5*time.Minute, "how long to wait for the answer")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	cfg, err := loadConfig(*cfgPath, nil)
	if err != nil {
		return err
	}
	if *base == "" {
		host, port, err := net.SplitHostPort(cfg.HTTP.Addr)
		if err != nil {
			return fmt.Errorf("http.addr %q: %w", cfg.HTTP.Addr, err)
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "127.0.0.1"
		}
		*base = "http://" + net.JoinHostPort(host, port)
	}
	q := url.Values{}
	if *peerDown {
		q.Set("peer_down", "true")
	}
	if *discard {
		q.Set("discard_tail", "true")
	}
	u := strings.TrimRight(*base, "/") + "/api/v1/cluster/" + url.PathEscape(action) + "?" + q.Encode()
	req, err := http.NewRequest(http.MethodPost, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+cfg.HTTP.AdminToken)
	resp, err := (&http.Client{Timeout: *timeout}).Do(req)
	if err != nil {
		return fmt.Errorf("standby %s: %w", action, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	fmt.Fprintln(stdout, strings.TrimSpace(string(body)))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("standby %s: %s", action, resp.Status)
	}
	return nil
}
