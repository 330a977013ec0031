package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// rssKiB reads a process's resident set size.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			require.NoError(t, err)
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// connectRaw opens an MQTT 3.1.1 connection as id and returns it once the
// CONNACK says accepted; the connection then stays idle.
func connectRaw(addr, id, secret string) (net.Conn, byte, error) {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, 0, err
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: id, Clean: true, Keepalive: 600,
			UsernameFlag: true, Username: []byte(id), PasswordFlag: true, Password: []byte(secret)}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		conn.Close()
		return nil, 0, err
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		conn.Close()
		return nil, 0, err
	}
	ack := make([]byte, 4) // 0x20 0x02 flags code
	if _, err := io.ReadFull(conn, ack); err != nil {
		conn.Close()
		return nil, 0, err
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, ack[3], nil
}

// A flood of idle, authenticated MQTT connections costs bounded memory per
// connection, and ingest.mqtt.max_connections caps them. Quick form 2,000
// connections; make test-long sets CITYPULSE_TEST_CONNS=10000.
func TestIdleConnectionFloodMemory(t *testing.T) {
	skipShort(t)
	n := 2000
	if v := os.Getenv("CITYPULSE_TEST_CONNS"); v != "" {
		var err error
		n, err = strconv.Atoi(v)
		require.NoError(t, err)
	}
	// The test and the server each hold one descriptor per connection, and
	// the server keeps a reserve for its files (a tenth of its open-files
	// limit, at least 256; ingest.connectionsAllowedByOpenFiles) and slots
	// for connections not authenticated yet (ingest.connectionBudget).
	var fds syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &fds))
	allowed := int(fds.Max) - max(256, int(fds.Max)/10)
	if allowed -= min(1024, allowed/4); n+100 > allowed {
		n = allowed - 100
		if n < 500 {
			t.Skipf("open-files limit %d is too low for a connection flood", fds.Max)
		}
		t.Logf("open-files limit %d: flooding with %d connections", fds.Max, n)
	}
	limit := n + 100
	s := newProc(t, fmt.Sprintf("ingest:\n  mqtt:\n    max_connections: %d\n", limit))
	var devs strings.Builder
	devs.WriteString("devices:\n")
	for i := range limit + 50 {
		fmt.Fprintf(&devs, "  - {id: flood-%05d, kind: parking, district: d%d, interval: 60s, secret: flood-secret-%05d}\n", i, i%10, i)
	}
	require.NoError(t, os.WriteFile(filepath.Join(s.dir, "devices.yaml"), []byte(devs.String()), 0o600))
	s.start()
	defer s.stop()
	pid := s.Pid()
	time.Sleep(time.Second) // let start-up settle
	before := rssKiB(t, pid)

	conns := make([]net.Conn, 0, limit)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	t0 := time.Now()
	for i := range n {
		c, code, err := connectRaw(s.mqtt, fmt.Sprintf("flood-%05d", i), fmt.Sprintf("flood-secret-%05d", i))
		require.NoError(t, err, "connection %d", i)
		require.Zero(t, code, "connection %d accepted", i)
		conns = append(conns, c)
	}
	took := time.Since(t0)
	time.Sleep(2 * time.Second)
	after := rssKiB(t, pid)
	perConn := float64(after-before) * 1024 / float64(n)
	t.Logf("%d idle MQTT connections (opened in %v): server RSS %d MiB -> %d MiB, %.1f KiB per connection",
		n, took.Round(time.Millisecond), before/1024, after/1024, perConn/1024)
	require.Less(t, perConn, 256.0*1024, "an idle connection costs less than 256 KiB")

	// up to the limit, then refused; the server is still up
	for i := n; i < limit; i++ {
		c, code, err := connectRaw(s.mqtt, fmt.Sprintf("flood-%05d", i), fmt.Sprintf("flood-secret-%05d", i))
		require.NoError(t, err)
		require.Zero(t, code)
		conns = append(conns, c)
	}
	refused := 0
	for i := limit; i < limit+50; i++ {
		c, code, err := connectRaw(s.mqtt, fmt.Sprintf("flood-%05d", i), fmt.Sprintf("flood-secret-%05d", i))
		if err != nil || code != 0 {
			refused++
		}
		if c != nil {
			c.Close()
		}
	}
	t.Logf("over ingest.mqtt.max_connections=%d: %d of 50 further connections refused", limit, refused)
	require.Equal(t, 50, refused, "connections over the limit are refused")
	require.Contains(t, get(t, "http://"+s.http+"/readyz"), "ready")
}
