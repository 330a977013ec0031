// Command citypulse is the CityPulse server: it wires the gateways, the
// pipeline and the stores from the config and runs them until SIGINT/SIGTERM.
//
//	citypulse serve [--config configs/citypulse.yaml] [--data-dir DIR]
//	                [--mqtt-addr :1883] [--coap-addr :5683] [--http-addr :8080]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "citypulse:", err)
		os.Exit(1)
	}
}

const usage = `usage: citypulse <command> [flags]

commands:
  serve     run the server (gateways, pipeline, stores, HTTP API)
  config    print the effective config (secrets masked) and exit
  standby   disaster recovery: standby <activate|promote|salvage|demote> [--peer-down] [--discard-tail]
            (asks the node at http.addr of the config, with http.admin_token)
  version   print the version

run 'citypulse serve -h' for the flags.`

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return errors.New("no command")
	}
	switch args[0] {
	case "serve", "config":
	case "standby":
		return runStandby(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "citypulse", version)
		return nil
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, usage)
		return nil
	default:
		fmt.Fprintln(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
	fs := flag.NewFlagSet("citypulse "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "configs/citypulse.yaml", "config file (YAML); every key can also be set by a CITYPULSE_<SECTION>_<KEY> environment variable")
	fs.String("data-dir", "", "data directory (data_dir)")
	fs.String("mqtt-addr", "", "embedded MQTT broker listen address (ingest.mqtt.addr, default :1883)")
	fs.String("coap-addr", "", "CoAP UDP listen address (ingest.coap.addr, default :5683)")
	fs.String("dtls-addr", "", "CoAP DTLS listen address (ingest.coap.dtls_addr, default :5684)")
	fs.String("http-addr", "", "HTTP API listen address (http.addr, default :8080)")
	fs.String("devices", "", "device list (devices.file, default configs/devices.yaml)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	overrides := map[string]any{}
	for flagName, key := range map[string]string{
		"data-dir": "data_dir", "mqtt-addr": "ingest.mqtt.addr", "coap-addr": "ingest.coap.addr",
		"dtls-addr": "ingest.coap.dtls_addr", "http-addr": "http.addr", "devices": "devices.file",
	} {
		if isSet(fs, flagName) {
			overrides[key] = fs.Lookup(flagName).Value.String()
		}
	}
	cfg, err := loadConfig(*cfgPath, overrides)
	if err != nil {
		return err
	}
	if args[0] == "config" {
		return printConfig(stdout, cfg)
	}
	s, err := newServer(cfg, stderr)
	if err != nil {
		return err
	}
	return runWithSignals(s)
}

// runWithSignals runs s; SIGINT and SIGTERM stop it, SIGHUP reloads the rules.
// This is the one place the server meets signals.
func runWithSignals(s *server) error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	for {
		select {
		case err := <-done:
			return err
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				stop()
				continue
			}
			if err := s.Reload(); err == nil {
				s.log.Info("rules reloaded on SIGHUP")
			}
		}
	}
}

func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			set = true
		}
	})
	return set
}

var version = "dev"
