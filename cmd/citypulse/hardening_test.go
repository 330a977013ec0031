package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const hardeningAdmin = "admin-token-hardening-0001"

// closedWithin reports whether the server closes c within d (the client
// neither writes nor closes).
func closedWithin(c net.Conn, d time.Duration) error {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("the connection stayed open for %v", d)
	}
	return nil // EOF or reset: closed by the server
}

// Every HTTP connection has a deadline: idle keep-alive connections, slow
// headers and slow bodies are closed by the server, not kept for as long as
// the client likes.
func TestHTTPTimeoutsCloseIdleAndSlowConnections(t *testing.T) {
	s := newInproc(t, "http: {admin_token: "+hardeningAdmin+", read_header_timeout: 300ms, read_timeout: 500ms, idle_timeout: 300ms}\n")
	s.run()
	addr := s.s.HTTPAddr().String()
	tests := []struct {
		name  string
		write string
		reply bool // read one response first
	}{
		{"an idle keep-alive connection after GET /healthz", "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", true},
		{"a request whose headers never end", "GET /healthz HTTP/1.1\r\nHost: x\r\n", false},
		{"a reload whose body never comes", "POST /-/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + hardeningAdmin +
			"\r\nContent-Length: 100\r\n\r\n0123456789", false},
		{"a device add whose body never comes", "POST /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + hardeningAdmin +
			"\r\nContent-Length: 100\r\n\r\n{\"id\":", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			require.NoError(t, err)
			defer c.Close()
			_, err = io.WriteString(c, tt.write)
			require.NoError(t, err)
			if tt.reply {
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				require.NoError(t, err)
				require.Equal(t, http.StatusOK, resp.StatusCode)
				resp.Body.Close()
			}
			require.NoError(t, closedWithin(c, 10*time.Second))
		})
	}
}

// Bodies are bounded on every endpoint; a body over the limit is refused
// from its Content-Length, before it is read.
func TestHTTPBodyLimits(t *testing.T) {
	s := newInproc(t, "http: {admin_token: "+hardeningAdmin+"}\n")
	s.run()
	tests := []struct {
		name, path string
		length     int
	}{
		{"a 50 MB reload body", "/-/reload", 50 << 20},
		{"a 2 MB device", "/api/v1/devices", 2 << 20},
		{"a 50 MB query form", "/api/v1/query", 50 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("tcp", s.s.HTTPAddr().String())
			require.NoError(t, err)
			defer c.Close()
			fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n",
				tt.path, hardeningAdmin, tt.length)
			_, err = c.Write(make([]byte, 64<<10)) // a first part; the rest never comes
			require.NoError(t, err)
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode)
		})
	}
}

// metric scrapes one sample of the server's /metrics.
func (p *inproc) metric(series string) float64 {
	p.t.Helper()
	return metricValue(p.t, p.httpHost(), series)
}

// HTTP connections are bounded in total and per source address; the ones over
// a limit are closed at once and counted.
func TestHTTPConnectionLimits(t *testing.T) {
	s := newInproc(t, "http: {max_connections: 6, max_connections_per_host: 4}\nopendata: {max_streams: 1, max_streams_per_client: 1}\n")
	s.run()
	addr := s.s.HTTPAddr().String()
	dial := func(from string) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", addr)
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	// alive answers one request on c (the server has taken it).
	alive := func(c net.Conn) bool {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return false
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	for i := range 4 {
		require.True(t, alive(dial("127.0.0.1")), "connection %d from 127.0.0.1", i+1)
	}
	require.False(t, alive(dial("127.0.0.1")), "a fifth connection from one address is refused")
	require.True(t, alive(dial("127.0.0.2")))
	require.True(t, alive(dial("127.0.0.2")))
	require.False(t, alive(dial("127.0.0.2")), "a seventh connection in all is refused")

	require.Equal(t, 1.0, s.metric(`citypulse_http_connections_refused_total{reason="per_host"}`))
	require.Equal(t, 1.0, s.metric(`citypulse_http_connections_refused_total{reason="total"}`))
}

// The authorization scheme is case-insensitive (RFC 7235 section 2.1).
func TestBearerSchemeIsCaseInsensitive(t *testing.T) {
	const read = "read-token-case-0000001"
	s := newInproc(t, "http: {read_token: "+read+"}\n")
	for _, tt := range []struct {
		header string
		want   int
	}{
		{"Bearer " + read, http.StatusOK},
		{"bearer " + read, http.StatusOK},
		{"BEARER " + read, http.StatusOK},
		{"Bearer  " + read, http.StatusOK},
		{"Basic " + read, http.StatusUnauthorized},
		{"Bearer" + read, http.StatusUnauthorized},
		{"bearer wrong-token-000000000", http.StatusUnauthorized},
	} {
		t.Run(tt.header, func(t *testing.T) {
			req, _ := http.NewRequest("GET", s.url+"/api/v1/devices", nil)
			req.Header.Set("Authorization", tt.header)
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Equal(t, tt.want, resp.StatusCode)
		})
	}
}

// A device add is one JSON object with a bounded secret, nothing after it.
func TestDeviceAddRefusesTrailingDataAndLongSecrets(t *testing.T) {
	s := newInproc(t, "http: {admin_token: "+hardeningAdmin+"}\n")
	dev := func(id, secret string) string {
		return fmt.Sprintf(`{"id":%q,"kind":"pipe","district":"gulou","interval":"10s","secret":%q}`, id, secret)
	}
	for _, tt := range []struct {
		name, body string
		want       int
	}{
		{"a second object after the first", dev("pipe-0301", "secret-0301") + dev("pipe-0302", "secret-0302"), http.StatusBadRequest},
		{"garbage after the object", dev("pipe-0303", "secret-0303") + "garbage", http.StatusBadRequest},
		{"a 257-byte secret", dev("pipe-0304", strings.Repeat("s", 257)), http.StatusBadRequest},
		{"a 100 KB secret", dev("pipe-0305", strings.Repeat("s", 100<<10)), http.StatusRequestEntityTooLarge},
		{"a 256-byte secret", dev("pipe-0306", strings.Repeat("s", 256)), http.StatusCreated},
		{"whitespace after the object", dev("pipe-0307", "secret-0307") + "\n \t", http.StatusCreated},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, body := s.do("POST", "/api/v1/devices", hardeningAdmin, tt.body)
			require.Equal(t, tt.want, code, body)
		})
	}
	_, list := s.do("GET", "/api/v1/devices", hardeningAdmin, "")
	for _, id := range []string{"pipe-0301", "pipe-0302", "pipe-0303", "pipe-0304", "pipe-0305"} {
		require.NotContains(t, list, id, "a refused device was added")
	}
}

// openUnder counts this process's descriptors on files under dir.
func openUnder(t *testing.T, dir string) []string {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("needs /proc/self/fd")
	}
	var open []string
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err == nil && strings.HasPrefix(target, dir) {
			open = append(open, target)
		}
	}
	return open
}

// A start-up that fails after the journal and the stores are open (here: the
// MQTT port is taken) closes them again.
func TestAFailedStartClosesWhatItOpened(t *testing.T) {
	dir := t.TempDir()
	cfg := inprocConfig(t, dir, "")
	taken, err := net.Listen("tcp", cfg.Ingest.MQTT.Addr)
	require.NoError(t, err)
	defer taken.Close()
	_, err = newServer(cfg, io.Discard)
	require.ErrorContains(t, err, "MQTT")
	require.Empty(t, openUnder(t, dir), "files left open after a failed start")
	require.FileExists(t, filepath.Join(dir, "data", "journal", "shards"), "the journal was opened before the failure")
}
