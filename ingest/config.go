package ingest

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"github.com/citypulse/citypulse/devices"
)

// Devices is what the gateways need of the device registry.
type Devices interface {
	Get(id string) (devices.Device, bool)
	Authenticate(id, secret string) (devices.Device, bool)
}

// Config is the ingest section of the server config.
type Config struct {
	// MaxPast and MaxFuture bound a reading's timestamp relative to the server's clock.
	MaxPast   time.Duration `mapstructure:"max_past" yaml:"max_past"`
	MaxFuture time.Duration `mapstructure:"max_future" yaml:"max_future"`

	// RateLimit bounds what one device may send.
	RateLimit RateLimitConfig `mapstructure:"rate_limit" yaml:"rate_limit"`

	MQTT     MQTTConfig     `mapstructure:"mqtt" yaml:"mqtt"`
	External ExternalConfig `mapstructure:"external" yaml:"external"`
	CoAP     CoAPConfig     `mapstructure:"coap" yaml:"coap"`
}

// RateLimitConfig is a token bucket per device, in readings.
type RateLimitConfig struct {
	// ReadingsPerSecond is the sustained rate (0: no limit).
	ReadingsPerSecond float64 `mapstructure:"readings_per_second" yaml:"readings_per_second"`
	// Burst is how many readings a device may send at once (a backfill after
	// an outage); at least ReadingsPerSecond.
	Burst int `mapstructure:"burst" yaml:"burst"`
}

// MQTTConfig configures the embedded broker.
type MQTTConfig struct {
	Enabled bool   `mapstructure:"enabled" yaml:"enabled"`
	Addr    string `mapstructure:"addr" yaml:"addr"` // TCP listen address; "" with TLSAddr set: TLS only
	// MaxConnections bounds concurrent client connections (0: unlimited).
	MaxConnections int `mapstructure:"max_connections" yaml:"max_connections"`
	// ConnectTimeout is how long a connection may take to send CONNECT (on
	// TLSAddr: to finish the TLS handshake and send CONNECT); it is closed then.
	ConnectTimeout time.Duration `mapstructure:"connect_timeout" yaml:"connect_timeout"`
	// MaxPendingConnections bounds the connections that have not authenticated
	// yet, on both ports together; MaxPendingPerAddress bounds them per source
	// address (IPv6: per /64). Connections past either are closed at once.
	MaxPendingConnections int `mapstructure:"max_pending_connections" yaml:"max_pending_connections"`
	MaxPendingPerAddress  int `mapstructure:"max_pending_per_address" yaml:"max_pending_per_address"`
	// TLSAddr is the MQTT-over-TLS listen address (":8883"); empty disables it.
	// CertFile and KeyFile are the server's PEM certificate chain and key.
	TLSAddr  string `mapstructure:"tls_addr" yaml:"tls_addr"`
	CertFile string `mapstructure:"cert_file" yaml:"cert_file"`
	KeyFile  string `mapstructure:"key_file" yaml:"key_file"`
}

// ExternalConfig configures external-broker mode: CityPulse subscribes to a
// broker the city already runs.
type ExternalConfig struct {
	Enabled  bool   `mapstructure:"enabled" yaml:"enabled"`
	URL      string `mapstructure:"url" yaml:"url"` // tcp://host:1883
	ClientID string `mapstructure:"client_id" yaml:"client_id"`
	Username string `mapstructure:"username" yaml:"username"`
	Password string `mapstructure:"password" yaml:"password"`
	// Topic is the subscription; the device id is the topic level after "devices/".
	Topic string `mapstructure:"topic" yaml:"topic"`
	QoS   byte   `mapstructure:"qos" yaml:"qos"`
}

// CoAPConfig configures the CoAP gateway.
type CoAPConfig struct {
	Enabled  bool   `mapstructure:"enabled" yaml:"enabled"`
	Addr     string `mapstructure:"addr" yaml:"addr"`           // UDP listen address
	DTLSAddr string `mapstructure:"dtls_addr" yaml:"dtls_addr"` // DTLS-PSK listen address; empty disables DTLS
	// AllowUnauthenticated lets plain-UDP requests in with only the device id from
	// the path. When false (the default) a plain-UDP request must carry the
	// device's secret as the URI query "key=<secret>"; DTLS is always authenticated.
	AllowUnauthenticated bool `mapstructure:"allow_unauthenticated" yaml:"allow_unauthenticated"`
	// Blockwise bounds the partial block-wise (RFC 7959) uploads held while
	// their blocks arrive.
	Blockwise BlockwiseConfig `mapstructure:"blockwise" yaml:"blockwise"`
}

// Default returns the embedded defaults.
func Default() Config {
	return Config{
		MaxPast:   7 * 24 * time.Hour,
		MaxFuture: 10 * time.Minute,
		RateLimit: RateLimitConfig{ReadingsPerSecond: 1000, Burst: 20000},
		MQTT: MQTTConfig{Enabled: true, Addr: ":1883", MaxConnections: 100000,
			ConnectTimeout: defaultConnectTimeout, MaxPendingConnections: defaultMaxPending, MaxPendingPerAddress: defaultMaxPendingPerAddress},
		External: ExternalConfig{
			ClientID: "citypulse",
			Topic:    "$share/citypulse/devices/+/readings",
			QoS:      1,
		},
		CoAP: CoAPConfig{Enabled: true, Addr: ":5683", DTLSAddr: ":5684", Blockwise: DefaultBlockwise()},
	}
}

// Validate checks the section; messages name the offending key.
func (c Config) Validate() error {
	var errs []error
	if c.MaxPast <= 0 {
		errs = append(errs, fmt.Errorf("ingest.max_past must be > 0, got %v", c.MaxPast))
	}
	if c.MaxFuture <= 0 {
		errs = append(errs, fmt.Errorf("ingest.max_future must be > 0, got %v", c.MaxFuture))
	}
	if c.RateLimit.ReadingsPerSecond < 0 {
		errs = append(errs, fmt.Errorf("ingest.rate_limit.readings_per_second must be >= 0 (0: no limit), got %g", c.RateLimit.ReadingsPerSecond))
	}
	if c.RateLimit.ReadingsPerSecond > 0 && float64(c.RateLimit.Burst) < c.RateLimit.ReadingsPerSecond {
		errs = append(errs, fmt.Errorf("ingest.rate_limit.burst (%d) must be at least readings_per_second (%g)", c.RateLimit.Burst, c.RateLimit.ReadingsPerSecond))
	}
	if c.MQTT.Enabled && c.MQTT.TLSAddr != "" {
		errs = append(errs, checkAddr("ingest.mqtt.tls_addr", c.MQTT.TLSAddr))
		if c.MQTT.CertFile == "" || c.MQTT.KeyFile == "" {
			errs = append(errs, errors.New("ingest.mqtt.tls_addr needs ingest.mqtt.cert_file and ingest.mqtt.key_file"))
		}
	}
	if c.MQTT.Enabled && (c.MQTT.Addr != "" || c.MQTT.TLSAddr == "") {
		// addr may be empty only when TLS is on: MQTT over TLS alone
		errs = append(errs, checkAddr("ingest.mqtt.addr", c.MQTT.Addr))
	}
	if c.MQTT.MaxConnections < 0 {
		errs = append(errs, fmt.Errorf("ingest.mqtt.max_connections must be >= 0"))
	}
	if c.MQTT.Enabled {
		errs = append(errs, c.MQTT.validatePending())
	}
	if c.External.Enabled {
		u, err := url.Parse(c.External.URL)
		if err != nil || u.Host == "" || (u.Scheme != "tcp" && u.Scheme != "mqtt" && u.Scheme != "ssl" && u.Scheme != "tls") {
			errs = append(errs, fmt.Errorf("ingest.external.url %q: want tcp://host:port or ssl://host:port", c.External.URL))
		}
		if c.External.Topic == "" {
			errs = append(errs, errors.New("ingest.external.topic must not be empty"))
		}
		if c.External.QoS > 1 {
			errs = append(errs, fmt.Errorf("ingest.external.qos must be 0 or 1, got %d", c.External.QoS))
		}
		if c.External.ClientID == "" {
			errs = append(errs, errors.New("ingest.external.client_id must not be empty"))
		}
	}
	if c.CoAP.Enabled {
		errs = append(errs, checkAddr("ingest.coap.addr", c.CoAP.Addr))
		if c.CoAP.DTLSAddr != "" {
			errs = append(errs, checkAddr("ingest.coap.dtls_addr", c.CoAP.DTLSAddr))
		}
		errs = append(errs, c.CoAP.Blockwise.Validate())
	}
	if !c.MQTT.Enabled && !c.External.Enabled && !c.CoAP.Enabled {
		errs = append(errs, errors.New("ingest: enable at least one of ingest.mqtt, ingest.external, ingest.coap"))
	}
	return errors.Join(errs...)
}

// Defaults of the limits on connections that have not authenticated yet.
const (
	defaultConnectTimeout       = 10 * time.Second
	defaultMaxPending           = 1024
	defaultMaxPendingPerAddress = 64
)

func (c MQTTConfig) validatePending() error {
	var errs []error
	if c.ConnectTimeout <= 0 || c.ConnectTimeout > 5*time.Minute {
		errs = append(errs, fmt.Errorf("ingest.mqtt.connect_timeout must be in (0, 5m], got %v", c.ConnectTimeout))
	}
	if c.MaxPendingConnections <= 0 {
		errs = append(errs, fmt.Errorf("ingest.mqtt.max_pending_connections must be > 0, got %d", c.MaxPendingConnections))
	}
	if c.MaxPendingPerAddress <= 0 || c.MaxPendingPerAddress > c.MaxPendingConnections {
		errs = append(errs, fmt.Errorf("ingest.mqtt.max_pending_per_address must be in [1, max_pending_connections (%d)], got %d",
			c.MaxPendingConnections, c.MaxPendingPerAddress))
	}
	return errors.Join(errs...)
}

func checkAddr(key, addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("%s %q: want host:port (e.g. \":1883\"): %v", key, addr, err)
	}
	return nil
}
