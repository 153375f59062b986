// A Go demo service (stdlib net/http only): `go_service CONFIG_JSON`.
//
// CONFIG_JSON is the same as py_service.py's. GET /<service>/r-<rid> calls every downstream `to`
// at /<to>/r-<rid>.<to>: mode "goroutine" calls from a new goroutine (all of them in parallel,
// the handler waits), mode "thread" calls from the handler's own goroutine, in order. The
// default Transport pools keep-alive connections. The true parent travels by hand in
// x-truth-parent / x-truth-hop and is written to the truth file (JSON lines).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

type call struct {
	To   string `json:"to"`
	Addr string `json:"addr"`
	Hop  string `json:"hop"`
	Mode string `json:"mode"`
}

type config struct {
	Service string `json:"service"`
	Listen  string `json:"listen"`
	Truth   string `json:"truth"`
	Calls   []call `json:"calls"`
}

type truthRow struct {
	Rid       string `json:"rid"`
	ParentRid string `json:"parent_rid"`
	Role      string `json:"role"`
	Service   string `json:"service"`
	Hop       string `json:"hop"`
	Peer      string `json:"peer,omitempty"`
}

var hopOfMode = map[string]string{"goroutine": "goroutine", "thread": "thread"}

type service struct {
	cfg    config
	mu     sync.Mutex
	truth  *os.File
	client *http.Client
}

func (s *service) log(rid, parent, role, hop, peer string) {
	line, _ := json.Marshal(truthRow{rid, parent, role, s.cfg.Service, hop, peer})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.truth.Write(append(line, '\n'))
}

func (s *service) call(c call, rid string) int {
	child := rid + "." + c.To
	s.log(child, rid, "client", hopOfMode[c.Mode], "")
	req, _ := http.NewRequest("GET", "http://"+c.Addr+"/"+c.To+"/r-"+child, nil)
	req.Header.Set("x-truth-parent", rid)
	req.Header.Set("x-truth-hop", c.Hop)
	resp, err := s.client.Do(req)
	if err != nil {
		return 599
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

func (s *service) handle(rid string) int {
	worst := 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	note := func(status int) {
		mu.Lock()
		if status > worst {
			worst = status
		}
		mu.Unlock()
	}
	for _, c := range s.cfg.Calls {
		if c.Mode == "goroutine" {
			wg.Add(1)
			go func(c call) {
				defer wg.Done()
				note(s.call(c, rid))
			}(c)
		}
	}
	for _, c := range s.cfg.Calls {
		if c.Mode == "thread" {
			note(s.call(c, rid))
		}
	}
	wg.Wait()
	return worst
}

func (s *service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	prefix := "/" + s.cfg.Service + "/r-"
	status := 404
	if strings.HasPrefix(r.URL.Path, prefix) {
		rid := strings.TrimPrefix(r.URL.Path, prefix)
		hop := r.Header.Get("x-truth-hop")
		if hop == "" {
			hop = "cross_node"
		}
		peer, _, _ := net.SplitHostPort(r.RemoteAddr)
		s.log(rid, r.Header.Get("x-truth-parent"), "server", hop, peer)
		status = s.handle(rid)
	} else if r.URL.Path == "/health" {
		status = 200
	}
	code := 200
	if status >= 400 {
		code = 502
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(code)
	fmt.Fprintf(w, "%s %d\n", s.cfg.Service, status)
}

func main() {
	var cfg config
	if err := json.Unmarshal([]byte(os.Args[1]), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bad config:", err)
		os.Exit(2)
	}
	truth, err := os.OpenFile(cfg.Truth, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	transport := &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 128, IdleConnTimeout: 0}
	s := &service{cfg: cfg, truth: truth, client: &http.Client{Transport: transport, Timeout: 10 * time.Second}}
	server := &http.Server{Addr: cfg.Listen, Handler: s}
	if err := server.ListenAndServe(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
