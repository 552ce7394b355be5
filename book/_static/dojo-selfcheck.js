// Records, once a page has loaded, how many images decoded, whether a MathML fraction was
// laid out as one (numerator above denominator) and how many interview answers are
// hidden: the book's browser test reads these from the DOM.
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("article img")].filter(i => i.complete && i.naturalWidth > 0).length;
  const frac = document.querySelector("mfrac");
  let stacked = false;
  if (frac && frac.children.length === 2) {
    const [top, bottom] = [...frac.children].map(e => e.getBoundingClientRect());
    stacked = top.bottom <= bottom.top + 1 && top.height > 0;
  }
  const answers = [...document.querySelectorAll("details.dojo-question > :not(summary)")];
  document.body.dataset.imagesRendered = images;
  document.body.dataset.fractionStacked = stacked;
  document.body.dataset.answersHidden = answers.filter(a => !a.checkVisibility()).length;
});
